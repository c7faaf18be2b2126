"""The stored layers an analysis reads, chosen with a layer spec ('all', '3', '0-5,10'): in a sharded (schema 2.0)
store the others are never read, since each layer is an inner chunk of its own."""

from __future__ import annotations

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


def as_index(positions: list[int]) -> slice | list[int]:
    """A slice where the positions are consecutive (dask then reads only their chunks), else the list."""
    consecutive = positions == list(range(positions[0], positions[-1] + 1))
    return slice(positions[0], positions[-1] + 1) if consecutive else positions


def select_layers(ds: xr.Dataset, spec: str, n_layers: int) -> xr.Dataset:
    """``ds`` cut to the layers of ``spec`` ('all': unchanged)."""
    if spec.strip() in ("", "all"):
        return ds
    return ds.isel(layer=as_index(layer_positions(ds.layer.values, spec, n_layers)))
