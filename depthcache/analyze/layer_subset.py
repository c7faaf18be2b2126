"""The stored layers an analysis reads, chosen with a layer spec ('all', '3', '0-5,10'): in a sharded (schema 2.0)
store the others are never read, since each layer is an inner chunk of its own."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from depthcache.errors import DepthcacheError
from depthcache.layerspec import parse_layers


def layer_positions(stored: np.ndarray, spec: str, n_layers: int) -> list[int]:
    """Positions in ``stored`` (the store's ``layer`` coordinate) of the layers of ``spec``; refuses layers the
    store does not hold."""
    wanted = parse_layers(spec, n_layers)
    where = {int(layer): i for i, layer in enumerate(stored)}
    missing = [layer for layer in wanted if layer not in where]
    if missing:
        raise DepthcacheError(f"layers {', '.join(map(str, missing[:5]))} are not stored (the store holds "
                              f"{', '.join(map(str, stored[:8]))}{' …' if len(stored) > 8 else ''})")
    return [where[layer] for layer in wanted]


def runs_of(positions: list[int]) -> list[slice]:
    """Sorted positions as slices of consecutive ones: [0, 1, 2, 10, 20, 21] → [0:3, 10:11, 20:22]. Dask reads only
    the chunks of a slice of a block (the slice goes into the read); a list of positions reads whole blocks."""
    runs: list[slice] = []
    for p in positions:
        if runs and runs[-1].stop == p:
            runs[-1] = slice(runs[-1].start, p + 1)
        else:
            runs.append(slice(p, p + 1))
    return runs


def take_layers(data: da.Array, positions: list[int], axis: int = 0) -> da.Array:
    """``data`` at ``positions`` along ``axis``, read run by run (see ``runs_of``)."""
    parts = [data[(slice(None),) * axis + (run,)] for run in runs_of(positions)]
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=axis)


def select_layers(ds: xr.Dataset, spec: str, n_layers: int) -> xr.Dataset:
    """``ds`` cut to the layers of ``spec`` ('all': unchanged), each run of consecutive layers read alone."""
    if spec.strip() in ("", "all"):
        return ds
    runs = runs_of(layer_positions(ds.layer.values, spec, n_layers))
    if len(runs) == 1:
        return ds.isel(layer=runs[0])
    layered = [name for name in ds.variables if "layer" in ds[name].dims]
    parts = xr.concat([ds[layered].isel(layer=run) for run in runs], dim="layer", data_vars="all", coords="minimal",
                      compat="override", join="override")
    return ds.drop_dims("layer").merge(parts)
