"""What an analysis reads: an opened store with its lazy dataset, runs, model head and identity."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from depthcache.dtypes import bf16_bits_to_float32, bfloat16
from depthcache.errors import DepthcacheError
from depthcache.store.arrays import holds_bits, open_arrays
from depthcache.store.head import read_head
from depthcache.store.identity import identity
from depthcache.store.io import open_group, read_block
from depthcache.store.layout import ATTRS_KEY, SITE_ARRAYS, absent_roles
from depthcache.store.schema import check_store

SITE_OF_ARRAY = {name: site for site, names in SITE_ARRAYS.items() for name in names}
BLOCK_BYTES = 128 * 2**20  # a dask block of a sharded array, as read (float32 for bf16 stores)


@dataclass
class Store:
    """An activation store opened read-only for analysis (local path or fsspec URL)."""

    location: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    bfloat16_as: str = "float32"  # bf16 activations as exact float32 (analyses) or ml_dtypes bfloat16 (users)
    runs_read: bool = field(default=False, init=False, repr=False, compare=False)  # set when runs are looked at

    @cached_property
    def group(self) -> zarr.Group:
        """The root zarr group, read-only."""
        return open_group(self.location, "r", storage_options=self.storage_options)

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """The store's provenance attributes (schema, limits, array metadata and chunk presence checked)."""
        return check_store(self.group)

    @cached_property
    def ds(self) -> xr.Dataset:
        """The baseline run as a lazy dataset (committed tokens only), from the group checked once by ``attrs``;
        a branch the model does not have appears as zeros (``with_absent_branches``)."""
        return with_absent_branches(lazy_dataset(self.group, self.attrs, self.bfloat16_as), self.attrs)

    def run(self, name: str) -> xr.Dataset:
        """An intervention run stored under ``runs/<name>`` as a lazy dataset (its own attributes checked)."""
        if name not in self.runs():
            raise DepthcacheError(f"{self.location} has no run {name!r}; runs: {', '.join(self.runs()) or 'none'}")
        group = self.group["runs"][name]
        return with_absent_branches(lazy_dataset(group, check_store(group), self.bfloat16_as), self.attrs)

    def runs(self) -> list[str]:
        """Names of the intervention runs in the store (noted in ``runs_read``: results then depend on them)."""
        self.runs_read = True
        return natural_sorted(self.group["runs"].group_keys()) if "runs" in self.group else []

    def layers(self, name: str, positions: list[int]) -> da.Array:
        """Baseline array ``name`` (layer axis first) at layer ``positions`` (sorted) only; see ``layer_runs``."""
        return layer_runs(self.group, self.attrs, name, consecutive_runs(positions), self.bfloat16_as)

    @cached_property
    def head(self) -> dict[str, Any]:
        """Final norm and unembedding (float32 numpy), for the logit lens."""
        return read_head(self.group, self.attrs)

    @property
    def n_layers(self) -> int:
        """Depth of the model the store came from."""
        return int(self.attrs["model"]["n_layers"])

    def require(self, *arrays: str) -> None:
        """Refuse clearly when the store lacks a site an analysis needs."""
        missing = [a for a in arrays if a not in self.ds]
        if missing:
            sites = sorted({SITE_OF_ARRAY.get(a, a) for a in missing})
            raise DepthcacheError(
                f"{self.location} lacks {', '.join(missing)}: re-extract with --sites including {', '.join(sites)} "
                f"(e.g. depthcache extract --sites resid,attn,mlp ...)")

    @cached_property
    def identity(self) -> str:
        """Hash of the baseline (model, data, options, committed tokens), not of its runs: keys cached results."""
        a = self.attrs
        key = {**identity(a), "tokens": a["progress"]["tokens_committed"], "created": a["created"]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def consecutive_runs(positions: list[int]) -> list[slice]:
    """Sorted positions as slices of consecutive ones: [0, 1, 2, 10, 20, 21] → [0:3, 10:11, 20:22]."""
    runs: list[slice] = []
    for p in positions:
        if runs and runs[-1].stop == p:
            runs[-1] = slice(runs[-1].start, p + 1)
        else:
            runs.append(slice(p, p + 1))
    return runs


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Names in human order: ``skip_2`` before ``skip_10``."""
    return sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


@dataclass(frozen=True)
class Committed:
    """The committed tokens of a store array as dask reads them, each block converted on read."""

    array: zarr.Array
    shape: tuple[int, ...]
    dtype: np.dtype
    convert: Callable[[np.ndarray], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.convert(read_block(self.array, key))


@dataclass(frozen=True)
class LayerRun:
    """Layers ``start:stop`` of a committed layered array (layer axis first) as dask reads them: a block asks for its
    own layers only, whatever dask's optimizer does with the slices taken of it."""

    source: Committed
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.source.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    @property
    def ndim(self) -> int:
        return self.source.ndim

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        first = slice(*key[0].indices(self.stop - self.start))
        return self.source[(slice(first.start + self.start, first.stop + self.start), *key[1:])]


def view_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns as ml_dtypes bfloat16 values (no copy)."""
    return bits.view(bfloat16())


def lazy_variable(array: zarr.Array, name: str, committed: int, chunk_tokens: int, bfloat16_as: str,
                  key: str) -> tuple[tuple[str, ...], da.Array | np.ndarray]:
    """(dims, dask array) of one checked store array, cut to its committed tokens before the graph is built, in
    blocks of ``chunk_tokens`` along tokens (see ``block_shape``)."""
    dims = tuple(array.metadata.dimension_names)
    source = committed_source(array, committed, bfloat16_as)
    if dims == (name,):  # an index coordinate (layer): read now, as xarray would to build its index
        return dims, source.convert(array[:source.shape[0]])
    chunks = block_shape(array, dims, source.shape, chunk_tokens, source.dtype.itemsize)
    data = da.from_array(source, chunks=chunks, name=f"{name}-{key}", lock=False, asarray=True,
                         meta=np.empty((0,) * len(source.shape), source.dtype))
    return dims, data


def committed_source(array: zarr.Array, committed: int, bfloat16_as: str) -> Committed:
    """What dask reads of a checked store array: its committed tokens, bf16 converted as ``bfloat16_as`` says."""
    dims = tuple(array.metadata.dimension_names)
    shape = tuple(min(committed, n) if d == "token" else n for d, n in zip(dims, array.shape))
    dtype, convert = array.dtype, np.asarray
    if holds_bits(array):
        dtype, convert = ((np.dtype(np.float32), bf16_bits_to_float32) if bfloat16_as == "float32"
                          else (bfloat16(), view_bfloat16))
    return Committed(array, shape, np.dtype(dtype), convert)


def layer_runs(group: zarr.Group, attrs: dict[str, Any], name: str, runs: list[slice],
               bfloat16_as: str = "float32") -> da.Array:
    """Layered array ``name`` at the layers of ``runs`` (positions along its layer axis) only, each run a dask array
    of its own over ``LayerRun``: no block reads a layer it does not return (a slice of the whole array's blocks
    reads their other layers unless dask's optimizer pushes the slice into the read)."""
    array = open_arrays(group)[name]
    source = committed_source(array, int(attrs["progress"]["tokens_committed"]), bfloat16_as)
    dims, chunk_tokens = tuple(array.metadata.dimension_names), int(attrs["layout"]["chunk_tokens"])
    key = tokenize(str(group.store), group.path, name, attrs.get("created"), bfloat16_as)
    parts = []
    for run in runs:
        view = LayerRun(source, run.start, run.stop)
        chunks = block_shape(array, dims, view.shape, chunk_tokens, source.dtype.itemsize)
        parts.append(da.from_array(view, chunks=chunks, name=f"{name}-{run.start}-{run.stop}-{key}", lock=False,
                                   asarray=True, meta=np.empty((0,) * view.ndim, source.dtype)))
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)


def block_shape(array: zarr.Array, dims: tuple[str, ...], shape: tuple[int, ...], chunk_tokens: int,
                itemsize: int) -> tuple[int, ...]:
    """Dask blocks of ``chunk_tokens`` tokens, whole along every other dim but ``layer`` of a sharded (2.0) array,
    which is split evenly into blocks of at most BLOCK_BYTES as read (a whole 2.0 chunk holds ~256 MiB as stored):
    each block reads its layers' inner chunks, and a block cut to one layer reads one inner chunk."""
    blocks = [chunk_tokens if d == "token" else n for d, n in zip(dims, shape)]
    if array.shards and "layer" in dims:
        axis = dims.index("layer")
        per_layer = chunk_tokens * math.prod(n for d, n in zip(dims, shape) if d not in ("layer", "token")) * itemsize
        groups = -(-shape[axis] // max(1, BLOCK_BYTES // per_layer))
        blocks[axis] = max(1, -(-shape[axis] // max(1, groups)))
    return tuple(blocks)


def lazy_dataset(group: zarr.Group, attrs: dict[str, Any], bfloat16_as: str = "float32") -> xr.Dataset:
    """A checked group as a lazy xarray Dataset of dask arrays over its committed tokens only (whatever the metadata
    claims, the graph covers committed chunks, which exist). bfloat16 arrays come as float32 (``bfloat16_as=
    "float32"``: widened exactly, block by block, ml_dtypes never imported; what analyses read) or as ml_dtypes
    bfloat16 (``"bfloat16"``: what users open)."""
    if bfloat16_as not in ("float32", "bfloat16"):
        raise ValueError(f"bfloat16_as must be 'float32' or 'bfloat16', not {bfloat16_as!r}")
    committed = int(attrs["progress"]["tokens_committed"])
    chunk_tokens = int(attrs["layout"]["chunk_tokens"])
    key = tokenize(str(group.store), group.path, committed, attrs.get("created"), bfloat16_as)
    ds = xr.Dataset({name: lazy_variable(array, name, committed, chunk_tokens, bfloat16_as, key)
                     for name, array in sorted(open_arrays(group).items())})
    ds.attrs = {ATTRS_KEY: attrs}
    return ds


def with_absent_branches(ds: xr.Dataset, attrs: dict[str, Any]) -> xr.Dataset:
    """The analysis view of a dataset whose model lacks a branch role: that role's array as lazy zeros shaped like
    the other branch array (exactly what such a layer adds; nothing stored, nothing read), so every analysis runs
    unchanged. What users open (``open_dataset``) shows the stored arrays only."""
    for role in absent_roles(attrs):
        name = f"{role}_out"
        template = next((ds[n] for n in ("attn_out", "mlp_out", "resid_pre") if n in ds and n != name), None)
        if name not in ds and template is not None and "layer" in template.dims:
            zeros = da.zeros(template.shape, dtype=template.dtype, chunks=template.data.chunks)
            ds = ds.assign({name: (template.dims, zeros, {"absent": f"the model has no {role} branch: zeros"})})
    return ds


def open_dataset(location: str | os.PathLike[str], group: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a store (or a run inside it) lazily as an xarray Dataset backed by dask arrays, checked once."""
    zgroup = open_group(location, "r", path=group, storage_options=storage_options)
    return lazy_dataset(zgroup, check_store(zgroup), bfloat16_as="bfloat16")
