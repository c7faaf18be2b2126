"""The activation store: a Zarr v3 group whose layout and root attributes are the depthcache contract.

Layout (schema 1.x, documented in docs/store-format.md and schemas/):

    STORE/                      root group, attrs["depthcache"] = provenance + progress
      resid_pre   (layer, token, d_model)   residual entering each stored layer
      resid_final (token, d_model)          residual after the last layer, before the final norm
      attn_out    (layer, token, d_model)   what attention adds to the residual
      mlp_out     (layer, token, d_model)   what the MLP adds to the residual
      layer       (layer,)                  model layer index of each stored layer
      token_id, doc_id, seq_id, position, next_token_id, next_logprob   (token,)
      item, answer_index, hops              (token,)  task stores only (schema 1.2)
      topk_ids, topk_logprobs               (token, k)
      model/                    final norm parameters, unembedding, tokenizer files
      runs/<name>/              intervention runs (same arrays over a token subset)
      analyses/<name>/          cached analysis results (xarray datasets)

Every array is chunked along tokens in chunks of ``chunk_tokens`` (all layers of a token range in one
chunk), each chunk written exactly once and whole, and checksummed with crc32c.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from depthcache.dtypes import STORED_DTYPES
from depthcache.errors import DepthcacheError

SCHEMA_VERSION = "1.2"  # 1.1: intervention runs under runs/<name>; 1.2: task stores (item, answer_index, hops)
ATTRS_KEY = "depthcache"
SITES = ("resid", "attn", "mlp")
SITE_ARRAYS = {"resid": ("resid_pre", "resid_final"), "attn": ("attn_out",), "mlp": ("mlp_out",)}
TARGET_CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_TOKENS = 16


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and dtypes of a store's arrays, fixed when it is created."""

    n_tokens: int
    layers: tuple[int, ...]
    d_model: int
    top_k: int
    sites: tuple[str, ...]
    dtype: str
    chunk_tokens: int
    task: bool = False  # a task store (schema 1.2): also the per-token arrays TASK_ARRAYS

    def activation_arrays(self) -> dict[str, tuple[str, ...]]:
        """Name → dimension names of each activation array this layout stores."""
        dims = {"resid_pre": ("layer", "token", "d_model"), "resid_final": ("token", "d_model"),
                "attn_out": ("layer", "token", "d_model"), "mlp_out": ("layer", "token", "d_model")}
        return {name: dims[name] for site in self.sites for name in SITE_ARRAYS[site]}


TOKEN_ARRAYS: dict[str, str] = {
    "token_id": "int32", "doc_id": "int32", "seq_id": "int32", "position": "int32",
    "next_token_id": "int32", "next_logprob": "float32",
}
# Task stores only: item index, k where the position predicts answer token k (else -1), the item's hops.
TASK_ARRAYS: dict[str, str] = {"item": "int32", "answer_index": "int32", "hops": "int32"}


def choose_chunk_tokens(n_layers: int, d_model: int, itemsize: int) -> int:
    """Largest power of two of tokens whose all-layer chunk stays within TARGET_CHUNK_BYTES."""
    per_token = max(n_layers, 1) * d_model * itemsize
    tokens = MIN_CHUNK_TOKENS
    while tokens * 2 * per_token <= TARGET_CHUNK_BYTES:
        tokens *= 2
    return tokens


def compressors(dtype: str) -> list[Any]:
    """Codecs after serialisation: zstd where it pays (bf16, ints), then the crc32c checksum always."""
    if dtype in ("float16", "float32"):
        return [Crc32cCodec()]  # activations in these dtypes barely compress (storage.md)
    return [ZstdCodec(level=1), Crc32cCodec()]


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs such as ``s3://bucket/run.zarr``."""
    return "://" in str(location)


def open_group(location: str | os.PathLike[str], mode: str = "r", path: str | None = None,
               storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open a store (local path or URL) or one of its subgroups, with a clear error when absent."""
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options and is_url(location):
        kwargs["storage_options"] = dict(storage_options)
    if path:
        kwargs["path"] = path
    try:
        return zarr.open_group(str(location), **kwargs)
    except FileNotFoundError as exc:
        raise DepthcacheError(f"no depthcache store at {location}{'/' + path if path else ''}") from exc
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise DepthcacheError(f"{location} is not a Zarr v3 store ({exc})") from exc
    except (ValueError, TypeError, KeyError) as exc:  # malformed zarr.json of an untrusted store
        raise DepthcacheError(f"{location}: unreadable zarr metadata ({type(exc).__name__}: {exc})") from exc


def local_name(location: str | os.PathLike[str]) -> Path:
    """A local path to name things after a store: the store itself, or its last URL component in the cwd."""
    text = str(location).rstrip("/")
    return Path.cwd() / text.rsplit("/", 1)[-1] if is_url(text) else Path(text)


def read_attrs(group: zarr.Group) -> dict[str, Any]:
    """The depthcache attributes of a store or run group, refusing stores that are not ours or too new."""
    attrs = group.attrs.asdict().get(ATTRS_KEY)
    if not isinstance(attrs, dict):
        raise DepthcacheError(f"{group.store} has no '{ATTRS_KEY}' attributes: not a depthcache store")
    version = str(attrs.get("schema_version", ""))
    if major(version) != major(SCHEMA_VERSION) or version_tuple(version) > version_tuple(SCHEMA_VERSION):
        raise DepthcacheError(
            f"store schema version {version!r} is newer than this depthcache understands "
            f"({SCHEMA_VERSION}); upgrade depthcache to read it")
    return attrs


def major(version: str) -> str:
    """Major part of a 'MAJOR.MINOR' schema version."""
    return version.split(".")[0]


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.2' → (1, 2); malformed versions sort as newest so they are refused."""
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (10**9,)


def create_arrays(group: zarr.Group, layout: StoreLayout) -> None:
    """Create every array of ``layout`` in ``group`` (empty, shapes fixed, chunks along tokens)."""
    n, t = layout.n_tokens, layout.chunk_tokens
    act_dtype = STORED_DTYPES[layout.dtype]
    for name, dims in layout.activation_arrays().items():
        shape = (len(layout.layers), n, layout.d_model) if dims[0] == "layer" else (n, layout.d_model)
        chunks = (len(layout.layers), t, layout.d_model) if dims[0] == "layer" else (t, layout.d_model)
        group.create_array(name, shape=shape, chunks=chunks, dtype=act_dtype, fill_value=0,
                           compressors=compressors(layout.dtype), dimension_names=dims)
    for name, dtype in (TOKEN_ARRAYS | (TASK_ARRAYS if layout.task else {})).items():
        group.create_array(name, shape=(n,), chunks=(t,), dtype=dtype, fill_value=0,
                           compressors=compressors("int32"), dimension_names=("token",))
    for name, dtype in (("topk_ids", "int32"), ("topk_logprobs", "float32")):
        group.create_array(name, shape=(n, layout.top_k), chunks=(t, layout.top_k), dtype=dtype,
                           fill_value=0, compressors=compressors("int32"), dimension_names=("token", "k"))
    if "resid" in layout.sites or "attn" in layout.sites or "mlp" in layout.sites:
        layer = group.create_array("layer", shape=(len(layout.layers),), dtype="int32",
                                   dimension_names=("layer",), compressors=None)
        layer[:] = np.asarray(layout.layers, dtype=np.int32)


def local_root(group: zarr.Group) -> Path | None:
    """Filesystem folder of a group on a LocalStore (None for remote stores)."""
    root = getattr(group.store, "root", None)
    if root is None or not isinstance(group.store, zarr.storage.LocalStore):
        return None
    return Path(root) / group.path if group.path else Path(root)


def fsync_tree(folder: Path, names: list[str]) -> None:
    """fsync the files under ``folder/name`` changed since the last sync, then their directories."""
    for name in names:
        for dirpath, _, files in os.walk(folder / name):
            for f in files:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def write_attrs(group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Replace the depthcache attributes atomically (temp file + rename + fsync on local stores)."""
    folder = local_root(group)
    if folder is None:
        group.attrs.update({ATTRS_KEY: attrs})
        return
    meta_path = folder / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("attributes", {})[ATTRS_KEY] = attrs
    tmp = meta_path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, meta_path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def string_encoding(ds: xr.Dataset) -> dict[str, dict]:
    """Store text variables as variable-length strings: numpy's fixed-width or StringDType text (pandas 3 string
    indexes) would become Zarr's fixed-length UTF-32, a data type without a Zarr v3 specification."""
    return {name: {"dtype": object} for name, var in ds.variables.items() if var.dtype.kind in "UT"}


def write_dataset_atomically(ds: xr.Dataset, folder: Path) -> None:
    """Write ``ds`` as a Zarr v3 group at ``folder`` via a hidden sibling renamed into place: never partial."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.writing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds.to_zarr(str(tmp), mode="w", zarr_format=3, consolidated=False, encoding=string_encoding(ds))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_default(value: Any) -> Any:
    """Make numpy scalars in attributes JSON-serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def open_dataset(location: str | os.PathLike[str], group: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a store (or a run inside it) lazily as an xarray Dataset backed by dask arrays."""
    from depthcache.schemas import check_store  # schemas imports this module

    zgroup = open_group(location, "r", path=group, storage_options=storage_options)
    attrs = check_store(zgroup)
    ds = xr.open_zarr(zgroup.store, group=group, consolidated=False, chunks={})
    ds.attrs = {ATTRS_KEY: attrs}
    committed = int(attrs["progress"]["tokens_committed"])
    if "token" in ds.dims and committed < ds.sizes["token"]:
        ds = ds.isel(token=slice(0, committed))
    return ds
