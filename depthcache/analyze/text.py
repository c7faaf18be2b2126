"""Results as text for the command line: a short summary by default, every value with ``--full``."""

from __future__ import annotations

from typing import Any

import pandas as pd
import xarray as xr

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
        parts.append(spec.describe(result))
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
