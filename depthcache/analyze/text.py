"""Results as text for the command line: a short summary by default, every value with ``--full``."""

from __future__ import annotations

from typing import Any

import pandas as pd
import xarray as xr

from depthcache.analyze.registry import check_params
from depthcache.analyze.runner import open_stores, result_params
from depthcache.errors import DepthcacheError
from depthcache.store import results
from depthcache.store.reader import Store

SHOWN_ROWS = 12
SHOWN_COLUMNS = 8
TABLE_DIMS = 2  # variables over more dimensions are only named in the summary


def by_dims(result: xr.Dataset) -> dict[tuple[str, ...], list[str]]:
    """Data variable names grouped by their dimensions, in the order they first appear."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, var in result.data_vars.items():
        groups.setdefault(tuple(map(str, var.dims)), []).append(str(name))
    return groups


def scalar_lines(result: xr.Dataset, names: list[str]) -> list[str]:
    """'name  value' for each 0-d variable."""
    width = max(map(len, names))
    return [f"{name:<{width}}  {result[name].values.item()!r}" if result[name].dtype.kind in "OUS"
            else f"{name:<{width}}  {result[name].values.item():.6g}" for name in names]


def table_text(result: xr.Dataset, names: list[str], full: bool) -> str:
    """The variables ``names`` (same dimensions) as one table, cut to a few rows and columns unless ``full``."""
    frame = result[names].drop_attrs().to_dataframe()[names]
    if full:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 0):
            return frame.to_string()
    return frame.to_string(max_rows=SHOWN_ROWS, max_cols=SHOWN_COLUMNS, show_dimensions=len(frame) > SHOWN_ROWS)


def result_text(spec: Any, result: xr.Dataset, full: bool = False) -> str:
    """What ``depthcache analyze`` prints: the analysis's own summary line, scalars and short tables."""
    sizes = ", ".join(f"{dim} {n}" for dim, n in result.sizes.items())
    parts = [f"{spec.name}: {sizes or 'scalars only'}"]
    if spec.describe is not None:
        try:
            parts.append(spec.describe(result))
        except Exception as exc:  # noqa: BLE001 - a cached result is untrusted: junk in it fails describing anyhow
            raise DepthcacheError(f"the cached {spec.name} result is not one this version can read "
                                  f"({type(exc).__name__}); recompute it with depthcache analyze {spec.name} STORE "
                                  "--force") from exc
    hidden = []
    for dims, names in by_dims(result).items():
        if not dims:
            parts.append("\n".join(scalar_lines(result, names)))
        elif full or len(dims) <= TABLE_DIMS:
            parts.append(table_text(result, names, full))
        else:
            hidden.append(f"{' × '.join(dims)}: {', '.join(names)}")
    if hidden:
        parts.append("not shown (--full prints them): " + "; ".join(hidden))
    elif not full and any(len(dims) and result[names[0]].size > SHOWN_ROWS for dims, names in by_dims(result).items()):
        parts.append("(long tables cut; --full prints every row)")
    return "\n\n".join(parts)


def entry_line(entry: results.Entry, stores: list[Store]) -> str:
    """One cached result: its parameters, where it is, and whether it is current for ``stores``."""
    state = "current" if results.current(entry, stores) else "stale: recomputed on next use"
    what = "(old format)" if entry.old else results.params_text(entry.params)
    return f"  {what}  [{state}]  {entry.place.location}/{entry.place.path(entry.name, entry.key)}"


def cache_text(spec: Any, locations: tuple[str, ...], params: dict[str, Any] | None, results_dir: str | None = None,
               storage_options: dict[str, Any] | None = None) -> str:
    """``analyze NAME STORE --list-cached``: every cached result of the analysis for these stores."""
    stores = open_stores(locations, storage_options)
    found = [e for place in results.places(stores[-1], results_dir) for e in results.entries(place, spec.name)]
    if not found:
        return f"{spec.name}: nothing cached for {locations[-1]}"
    return "\n".join([f"{spec.name}: {len(found)} cached for {locations[-1]}",
                      *(entry_line(e, stores) for e in found)])


def clear_text(spec: Any, locations: tuple[str, ...], params: dict[str, Any] | None,
               results_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """``analyze NAME STORE --clear [-p ...]``: remove cached results and say which."""
    if params:
        check_params(spec, params)
    full = result_params(spec, params) if params else None
    stores = open_stores(locations, storage_options)
    removed = results.clear(stores[-1], spec.name, full, results_dir)
    return "\n".join([f"{spec.name}: removed {len(removed)} cached result{'s' * (len(removed) != 1)}",
                      *(f"  {'(old format)' if e.old else results.params_text(e.params)}" for e in removed)])
