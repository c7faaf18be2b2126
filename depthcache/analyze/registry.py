"""The one registry of analyses. Adding an analysis is one new module in depthcache/analyze/ that uses @analysis."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from depthcache.errors import DepthcacheError

FRAMEWORK_MODULES = {"registry", "runner", "reduce", "plotting", "text", "compare"}  # not analyses


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: ``compute(*stores, **params) -> xr.Dataset`` and an optional ``plot(ds, folder)``."""

    name: str
    summary: str
    compute: Callable[..., xr.Dataset]
    n_stores: int = 1
    plot: Callable[[xr.Dataset, Path], list[Path]] | None = None
    describe: Callable[[xr.Dataset], str] | None = None  # one line for the command line's summary


ANALYSES: dict[str, Analysis] = {}


def analysis(name: str, summary: str, n_stores: int = 1,
             plot: Callable[[xr.Dataset, Path], list[Path]] | None = None,
             describe: Callable[[xr.Dataset], str] | None = None) -> Callable[[Callable[..., xr.Dataset]],
                                                                             Callable[..., xr.Dataset]]:
    """Decorator registering ``compute`` under ``name`` (the CLI name, e.g. 'logit-lens')."""
    def register(compute: Callable[..., xr.Dataset]) -> Callable[..., xr.Dataset]:
        if name in ANALYSES:
            raise RuntimeError(f"analysis {name!r} registered twice")
        ANALYSES[name] = Analysis(name, summary, compute, n_stores, plot, describe)
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


def parameters(spec: Analysis) -> dict[str, inspect.Parameter]:
    """The analysis's parameters (everything after its store arguments), by name."""
    return dict(list(inspect.signature(spec.compute).parameters.items())[spec.n_stores:])


def describe_parameters(spec: Analysis) -> str:
    """'name=default, ...' for help texts."""
    return ", ".join(f"{name}={json.dumps(p.default)}" for name, p in parameters(spec).items()) or "none"


def accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON-parsed ``value`` fits the type ``hint`` (bool, int, float, str, list[...], unions, None)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if origin is bool and isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if origin is str and isinstance(value, str):
            return True
        if origin is list and isinstance(value, list):
            inner = typing.get_args(option)
            return not inner or all(accepts(inner[0], v) for v in value)
    return False


def check_params(spec: Analysis, params: dict[str, Any]) -> None:
    """Refuse unknown parameters and values of the wrong type, naming what the analysis accepts."""
    known = parameters(spec)
    hints = typing.get_type_hints(spec.compute)
    for key, value in params.items():
        if key not in known:
            raise DepthcacheError(f"analysis {spec.name!r} has no parameter {key!r}; its parameters (with defaults): "
                                  f"{describe_parameters(spec)}")
        if key in hints and not accepts(hints[key], value):
            raise DepthcacheError(f"parameter {key}={json.dumps(value)} of {spec.name!r} must be of type "
                                  f"{typing_name(hints[key])} (e.g. -p {key}={json.dumps(known[key].default)})")


def typing_name(hint: Any) -> str:
    """A readable name of a type hint: 'bool', 'int | None', 'list[float] | None'."""
    return str(hint).replace("typing.", "").replace("NoneType", "None").removeprefix("<class '").removesuffix("'>")


def describe() -> list[tuple[str, str, int]]:
    """(name, summary, number of stores) of every analysis, sorted by name."""
    return [(a.name, a.summary, a.n_stores) for a in sorted(load_all().values(), key=lambda a: a.name)]
