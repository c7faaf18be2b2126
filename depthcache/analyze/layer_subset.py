"""The stored layers an analysis reads, chosen with a layer spec ('all', '3', '0-5,10'): in a sharded (schema 2.0)
store the others are never read, since each layer is an inner chunk of its own."""

from __future__ import annotations

import numpy as np
import xarray as xr

from depthcache.errors import DepthcacheError
from depthcache.layerspec import parse_layers
from depthcache.store.reader import consecutive_runs


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


def select_layers(ds: xr.Dataset, spec: str, n_layers: int) -> xr.Dataset:
    """``ds`` cut to the layers of ``spec`` ('all': unchanged), each run of consecutive layers sliced alone (dask
    pushes a slice into the read; a list of layers would read whole blocks)."""
    if spec.strip() in ("", "all"):
        return ds
    runs = consecutive_runs(layer_positions(ds.layer.values, spec, n_layers))
    if len(runs) == 1:
        return ds.isel(layer=runs[0])
    layered = [name for name in ds.variables if "layer" in ds[name].dims]
    parts = xr.concat([ds[layered].isel(layer=run) for run in runs], dim="layer", data_vars="all", coords="minimal",
                      compat="override", join="override")
    return ds.drop_dims("layer").merge(parts)
