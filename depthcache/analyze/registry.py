"""The one registry of analyses. Adding an analysis is one new module in depthcache/analyze/ that uses @analysis."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from depthcache.errors import DepthcacheError

FRAMEWORK_MODULES = {"registry", "source", "runner", "reduce", "plotting"}


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: ``compute(*stores, **params) -> xr.Dataset`` and an optional ``plot(ds, folder)``."""

    name: str
    summary: str
    compute: Callable[..., xr.Dataset]
    n_stores: int = 1
    plot: Callable[[xr.Dataset, Path], list[Path]] | None = None


ANALYSES: dict[str, Analysis] = {}


def analysis(name: str, summary: str, n_stores: int = 1,
             plot: Callable[[xr.Dataset, Path], list[Path]] | None = None) -> Callable[[Callable[..., xr.Dataset]],
                                                                                      Callable[..., xr.Dataset]]:
    """Decorator registering ``compute`` under ``name`` (the CLI name, e.g. 'logit-lens')."""
    def register(compute: Callable[..., xr.Dataset]) -> Callable[..., xr.Dataset]:
        if name in ANALYSES:
            raise RuntimeError(f"analysis {name!r} registered twice")
        ANALYSES[name] = Analysis(name, summary, compute, n_stores, plot)
        return compute
    return register


def load_all() -> dict[str, Analysis]:
    """Import every analysis module of this package once, so each registers itself."""
    package = importlib.import_module("depthcache.analyze")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in FRAMEWORK_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"depthcache.analyze.{info.name}")
    return ANALYSES


def get(name: str) -> Analysis:
    """The analysis called ``name``, or an error listing the known ones."""
    analyses = load_all()
    if name not in analyses:
        raise DepthcacheError(f"unknown analysis {name!r}; known: {', '.join(sorted(analyses))}")
    return analyses[name]


def describe() -> list[tuple[str, str, int]]:
    """(name, summary, number of stores) of every analysis, sorted by name."""
    return [(a.name, a.summary, a.n_stores) for a in sorted(load_all().values(), key=lambda a: a.name)]


def plot_with(name: str) -> Callable[[Callable[[xr.Dataset, Path], list[Path]]], Any]:
    """Decorator attaching a plot function to an already registered analysis."""
    def attach(plot: Callable[[xr.Dataset, Path], list[Path]]) -> Callable[[xr.Dataset, Path], list[Path]]:
        a = ANALYSES[name]
        ANALYSES[name] = Analysis(a.name, a.summary, a.compute, a.n_stores, plot)
        return plot
    return attach
