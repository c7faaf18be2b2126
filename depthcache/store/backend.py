"""The checked way into a store for users: ``depthcache.open(STORE)`` and ``xr.open_dataset(STORE, engine="depthcache")``.

Both validate the store once, cut it to its committed tokens, name its dims, make the token metadata coordinates
(``token_id``, ``doc_id``, ``position`` … so ``groupby("position")`` works), decode the tokens' text on request
(``token_text=True``) and open a skip run with ``run=``. Every dataset gets the ``.depthcache`` accessor:
``ds.depthcache.float32()`` and ``ds.depthcache.hook("blocks.3.hook_resid_pre")`` (TransformerLens names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendEntrypoint

from depthcache.errors import DepthcacheError
from depthcache.store.head import MODEL_GROUP, TOKENIZER_GROUP, head_attrs, tokenizer_files
from depthcache.store.hooks import hook_names, select_hook
from depthcache.store.layout import ATTRS_KEY, SITE_ARRAYS, TASK_ARRAYS, TOKEN_ARRAYS
from depthcache.store.reader import Store

ACTIVATIONS = tuple(name for names in SITE_ARRAYS.values() for name in names)
COORDINATES = tuple(TOKEN_ARRAYS) + tuple(TASK_ARRAYS) + ("skip_stop",)


def as_float32(ds: xr.Dataset) -> xr.Dataset:
    """The same lazy dataset with bfloat16/float16 activations cast to float32 block by block (for arithmetic)."""
    cast = {name: ds[name].astype("float32") for name in ACTIVATIONS if name in ds and ds[name].dtype.itemsize < 4}
    return ds.assign(cast)


def open_store(location: str | os.PathLike[str], run: str | None = None, *, float32: bool = False,
               token_text: bool = False, load_coords: bool = True, storage_options: Mapping[str, Any] | None = None,
               drop_variables: str | Iterable[str] | None = None) -> xr.Dataset:
    """A store (or its skip run ``run``) as a lazy, checked xarray Dataset with token metadata as coordinates;
    ``float32`` casts bf16/f16 activations for arithmetic, ``token_text`` adds the decoded ``token_text`` and
    ``next_token_text`` coordinates, ``load_coords`` reads the per-token coordinates into memory (4 bytes per
    token each) so ``groupby("position")`` works; activations stay lazy."""
    store = Store(str(location), dict(storage_options or {}), bfloat16_as="bfloat16")
    ds = store.run(run) if run else store.ds
    ds = ds.set_coords([name for name in COORDINATES if name in ds.variables])
    if load_coords:
        ds = ds.assign_coords({name: ds[name].load() for name in COORDINATES if name in ds.coords})
    if drop_variables is not None:
        ds = ds.drop_vars([drop_variables] if isinstance(drop_variables, str) else list(drop_variables),
                          errors="ignore")
    ds.attrs["runs"] = store.runs() if run is None else []
    if MODEL_GROUP in store.group:
        norm, _ = head_attrs(store.group[MODEL_GROUP])
        ds.attrs["final_norm"] = {"kind": norm["kind"], "eps": float(norm["eps"])}
    if token_text:
        ds = with_token_text(ds, vocabulary_text(store.group))
    return as_float32(ds) if float32 else ds


def vocabulary_text(group: Any) -> np.ndarray:
    """Each token id's text, decoded alone by the store's own tokenizer.json (the tokenizers library, no model)."""
    from tokenizers import Tokenizer

    if TOKENIZER_GROUP not in group:
        raise DepthcacheError("the store has no model/tokenizer group: token_text needs the tokenizer's files")
    files = tokenizer_files(group)
    if "tokenizer.json" not in files:
        raise DepthcacheError("the store's tokenizer has no tokenizer.json: token_text needs a fast tokenizer")
    try:
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - untrusted JSON may break the tokenizer parser in any way
        raise DepthcacheError(f"the store's tokenizer.json does not load ({type(exc).__name__}: {exc})") from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    return np.array(texts + [""], dtype=object)  # the last entry: ids the tokenizer does not know (-1: none)


def decode_ids(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Text of each id by table lookup; ids outside the vocabulary (such as -1) read as ''."""
    unknown = len(table) - 1
    return table[np.where((ids >= 0) & (ids < unknown), ids, unknown)]


def with_token_text(ds: xr.Dataset, table: np.ndarray) -> xr.Dataset:
    """``ds`` with lazy ``token_text`` and ``next_token_text`` coordinates decoded from the token ids."""
    texts = {}
    for ids, name in (("token_id", "token_text"), ("next_token_id", "next_token_text")):
        if ids in ds.coords:
            data = ds[ids].data
            decoded = (data.map_blocks(decode_ids, table, dtype=object) if hasattr(data, "map_blocks")
                       else decode_ids(np.asarray(data), table))
            texts[name] = (ds[ids].dims, decoded)
    return ds.assign_coords(texts)


@xr.register_dataset_accessor("depthcache")
class DepthcacheAccessor:
    """``ds.depthcache``: float32 view for arithmetic and TransformerLens hook names on a store's dataset."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def float32(self) -> xr.Dataset:
        """The same lazy dataset with bf16/f16 activations cast to float32 (xarray and dask arithmetic work)."""
        return as_float32(self._ds)

    def hook(self, name: str) -> xr.DataArray:
        """The activations TransformerLens calls ``name`` (e.g. 'blocks.3.hook_resid_pre'), lazily."""
        return select_hook(self._ds, name)

    def hook_names(self) -> list[str]:
        """Every TransformerLens hook name this dataset holds."""
        return hook_names(self._ds)


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
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "run", "float32", "token_text", "load_coords",
                               "storage_options")

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None,
                     run: str | None = None, float32: bool = False, token_text: bool = False,
                     load_coords: bool = True, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
        if not isinstance(filename_or_obj, (str, os.PathLike)):
            raise DepthcacheError("engine='depthcache' opens a store by its path or URL")
        return open_store(filename_or_obj, run=run, float32=float32, token_text=token_text, load_coords=load_coords,
                          storage_options=storage_options, drop_variables=drop_variables)

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return looks_like_store(filename_or_obj)
