"""The checked way into a store for users: ``depthcache.open(STORE)`` and ``xr.open_dataset(STORE, engine="depthcache")``.

Both validate the store once, cut it to its committed tokens, name its dims, make the token metadata coordinates
(``token_id``, ``doc_id``, ``position`` … so ``groupby("position")`` works) and open a skip run with ``run=``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import xarray as xr
from xarray.backends import BackendEntrypoint

from depthcache.errors import DepthcacheError
from depthcache.store.layout import ATTRS_KEY, SITE_ARRAYS, TASK_ARRAYS, TOKEN_ARRAYS
from depthcache.store.reader import Store

ACTIVATIONS = tuple(name for names in SITE_ARRAYS.values() for name in names)
COORDINATES = tuple(TOKEN_ARRAYS) + tuple(TASK_ARRAYS) + ("skip_stop",)


def as_float32(ds: xr.Dataset) -> xr.Dataset:
    """The same lazy dataset with bfloat16/float16 activations cast to float32 block by block (for arithmetic)."""
    cast = {name: ds[name].astype("float32") for name in ACTIVATIONS if name in ds and ds[name].dtype.itemsize < 4}
    return ds.assign(cast)


def open_store(location: str | os.PathLike[str], run: str | None = None, *, float32: bool = False,
               storage_options: Mapping[str, Any] | None = None,
               drop_variables: str | Iterable[str] | None = None) -> xr.Dataset:
    """A store (or its skip run ``run``) as a lazy, checked xarray Dataset with token metadata as coordinates."""
    store = Store(str(location), dict(storage_options or {}))
    ds = store.run(run) if run else store.ds
    ds = ds.set_coords([name for name in COORDINATES if name in ds.variables])
    if drop_variables is not None:
        ds = ds.drop_vars([drop_variables] if isinstance(drop_variables, str) else list(drop_variables),
                          errors="ignore")
    ds.attrs["runs"] = store.runs() if run is None else []
    return as_float32(ds) if float32 else ds


def looks_like_store(location: Any) -> bool:
    """True for a local folder whose root ``zarr.json`` carries depthcache attributes (cheap: one small read)."""
    try:
        meta = Path(os.fspath(location)) / "zarr.json"
        if not meta.is_file() or meta.stat().st_size > 2**20:
            return False
        return ATTRS_KEY in json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (TypeError, OSError, ValueError, AttributeError):
        return False


class DepthcacheBackendEntrypoint(BackendEntrypoint):
    """xarray backend ``engine="depthcache"``: the checked reader behind ``xr.open_dataset``."""

    description = "depthcache activation stores: validated once, committed tokens only, token metadata as coordinates"
    url = "https://pypi.org/project/depthcache/"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "run", "float32", "storage_options")

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None,
                     run: str | None = None, float32: bool = False,
                     storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
        if not isinstance(filename_or_obj, (str, os.PathLike)):
            raise DepthcacheError("engine='depthcache' opens a store by its path or URL")
        return open_store(filename_or_obj, run=run, float32=float32, storage_options=storage_options,
                          drop_variables=drop_variables)

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return looks_like_store(filename_or_obj)
