"""The one registry of analyses. Adding an analysis is one new module in depthcache/analyze/ that uses @analysis."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import pkgutil
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

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


def find(name: str) -> Analysis | None:
    """The analysis called ``name``, or None. Its own module (the name with '_' for '-', the convention every
    analysis here follows) is imported first, so running one analysis does not import all the others and their
    libraries; every module only when that finds nothing."""
    if name not in ANALYSES:
        module = name.replace("-", "_")
        if module.isidentifier() and module not in FRAMEWORK_MODULES and not module.startswith("_") and \
                importlib.util.find_spec(f"depthcache.analyze.{module}") is not None:
            importlib.import_module(f"depthcache.analyze.{module}")
        if name not in ANALYSES:
            load_all()
    return ANALYSES.get(name)


def get(name: str) -> Analysis:
    """The analysis called ``name``, or an error listing the known ones."""
    spec = find(name)
    if spec is None:
        raise DepthcacheError(f"unknown analysis {name!r}; known: {', '.join(sorted(load_all()))}")
    return spec


def parameters(spec: Analysis) -> dict[str, inspect.Parameter]:
    """The analysis's parameters (everything after its store arguments), by name."""
    return dict(list(inspect.signature(spec.compute).parameters.items())[spec.n_stores:])


def describe_parameters(spec: Analysis) -> str:
    """'name=default, ...' for help texts."""
    return ", ".join(f"{name}={json.dumps(p.default)}" for name, p in parameters(spec).items()) or "none"


@dataclass(frozen=True)
class Bounds:
    """``typing.Annotated`` metadata of a numeric analysis parameter: the range of values it accepts."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # ``low`` itself is excluded
    high_open: bool = False

    def allows(self, value: float) -> bool:
        """True if ``value`` lies in the range."""
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


Count = Annotated[int, Bounds(low=1)]  # a number of things (tokens, items): at least 1
Positive = Annotated[float, Bounds(low=0, low_open=True)]
Resamples = Annotated[int, Bounds(low=2)]  # bootstrap resamples (ci_resamples)
Level = Annotated[float, Bounds(low=0, high=1, low_open=True, high_open=True)]  # interval level (ci_level)


def accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON-parsed ``value`` fits the type ``hint`` (bool, int, float, str, list[...], unions, None, and
    ``Annotated[..., Bounds(...)]`` ranges); floats must be finite (JSON's NaN and Infinity are refused)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is Annotated:
            inner, *extras = typing.get_args(option)
            if accepts(inner, value) and all(b.allows(value) for b in extras if isinstance(b, Bounds)):
                return True
            continue
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if origin is bool and isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if (origin is float and isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value)):
            return True
        if origin is str and isinstance(value, str):
            return True
        if origin is list and isinstance(value, list):
            inner = typing.get_args(option)
            return not inner or all(accepts(inner[0], v) for v in value)
    return False


def check_params(spec: Analysis, params: dict[str, Any]) -> None:
    """Refuse unknown parameters and values of the wrong type or out of range, naming what the analysis accepts."""
    known = parameters(spec)
    hints = typing.get_type_hints(spec.compute, include_extras=True)
    for key, value in params.items():
        if key not in known:
            raise DepthcacheError(f"analysis {spec.name!r} has no parameter {key!r}; its parameters (with defaults): "
                                  f"{describe_parameters(spec)}")
        if key in hints and not accepts(hints[key], value):
            finite = ["finite"] if isinstance(value, float) and not math.isfinite(value) else []
            bounds = " and ".join([*finite, *map(str, hint_bounds(hints[key]))])
            raise DepthcacheError(f"parameter {key}={json.dumps(value)[:100]} of {spec.name!r} must be of type "
                                  f"{typing_name(hints[key])}{', ' + bounds if bounds else ''} "
                                  f"(e.g. -p {key}={json.dumps(known[key].default)})")


def hint_bounds(hint: Any) -> list[Bounds]:
    """The ranges ``Annotated`` puts on a type hint (inside unions too)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [b for option in typing.get_args(hint) for b in hint_bounds(option)]
    if typing.get_origin(hint) is Annotated:
        return [b for b in typing.get_args(hint)[1:] if isinstance(b, Bounds)]
    return []


def typing_name(hint: Any) -> str:
    """A readable name of a type hint, ranges left out: 'bool', 'int | None', 'list[float] | None'."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(typing_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is Annotated:
        return typing_name(typing.get_args(hint)[0])
    return str(hint).replace("typing.", "").replace("NoneType", "None").removeprefix("<class '").removesuffix("'>")


def describe() -> list[tuple[str, str, int]]:
    """(name, summary, number of stores) of every analysis, sorted by name."""
    return [(a.name, a.summary, a.n_stores) for a in sorted(load_all().values(), key=lambda a: a.name)]
