"""What an analysis reads: an opened store with its lazy dataset, runs, model head and identity."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import xarray as xr
import zarr

from depthcache.errors import DepthcacheError
from depthcache.store.head import read_head
from depthcache.store.identity import identity
from depthcache.store.io import open_group
from depthcache.store.layout import ATTRS_KEY, SITE_ARRAYS
from depthcache.store.schema import check_store

SITE_OF_ARRAY = {name: site for site, names in SITE_ARRAYS.items() for name in names}


@dataclass
class Store:
    """An activation store opened read-only for analysis (local path or fsspec URL)."""

    location: str
    storage_options: dict[str, Any] = field(default_factory=dict)
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
        """The baseline run as a lazy dataset (committed tokens only), from the group checked once by ``attrs``."""
        return lazy_dataset(self.group, self.attrs)

    def run(self, name: str) -> xr.Dataset:
        """An intervention run stored under ``runs/<name>`` as a lazy dataset (its own attributes checked)."""
        if name not in self.runs():
            raise DepthcacheError(f"{self.location} has no run {name!r}; runs: {', '.join(self.runs()) or 'none'}")
        group = self.group["runs"][name]
        return lazy_dataset(group, check_store(group))

    def runs(self) -> list[str]:
        """Names of the intervention runs in the store (noted in ``runs_read``: results then depend on them)."""
        self.runs_read = True
        return natural_sorted(self.group["runs"].group_keys()) if "runs" in self.group else []

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


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Names in human order: ``skip_2`` before ``skip_10``."""
    return sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def lazy_dataset(group: zarr.Group, attrs: dict[str, Any]) -> xr.Dataset:
    """A checked group as a lazy xarray Dataset backed by dask arrays, cut to its committed tokens before the dask
    graph is built: the graph covers only committed chunks (which exist), whatever the metadata claims."""
    ds = xr.open_dataset(group.store, group=group.path or None, engine="zarr", consolidated=False, chunks=None,
                         cache=False)
    ds.attrs = {ATTRS_KEY: attrs}
    committed = int(attrs["progress"]["tokens_committed"])
    if "token" in ds.dims and committed < ds.sizes["token"]:
        ds = ds.isel(token=slice(0, committed))
    return ds.chunk({"token": int(attrs["layout"]["chunk_tokens"])} if "token" in ds.dims else {})


def open_dataset(location: str | os.PathLike[str], group: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a store (or a run inside it) lazily as an xarray Dataset backed by dask arrays, checked once."""
    zgroup = open_group(location, "r", path=group, storage_options=storage_options)
    return lazy_dataset(zgroup, check_store(zgroup))
