"""What an analysis reads: an opened store with its lazy dataset, runs, model head and identity."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import xarray as xr
import zarr

from depthcache.errors import DepthcacheError
from depthcache.extract.modelstore import read_head
from depthcache.store import SITE_ARRAYS, open_dataset, open_group

SITE_OF_ARRAY = {name: site for site, names in SITE_ARRAYS.items() for name in names}


@dataclass
class Store:
    """An activation store opened read-only for analysis (local path or fsspec URL)."""

    location: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def group(self) -> zarr.Group:
        """The root zarr group, read-only."""
        return open_group(self.location, "r", storage_options=self.storage_options)

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """The store's provenance attributes (schema, limits, array metadata and chunk presence checked)."""
        from depthcache.schemas import check_store

        return check_store(self.group)

    @cached_property
    def ds(self) -> xr.Dataset:
        """The baseline run as a lazy dataset (committed tokens only)."""
        return open_dataset(self.location, storage_options=self.storage_options)

    def run(self, name: str) -> xr.Dataset:
        """An intervention run stored under ``runs/<name>`` as a lazy dataset."""
        if "runs" not in self.group or name not in self.group["runs"]:
            raise DepthcacheError(f"{self.location} has no run {name!r}")
        return open_dataset(self.location, group=f"runs/{name}", storage_options=self.storage_options)

    def runs(self) -> list[str]:
        """Names of the intervention runs in the store."""
        return sorted(self.group["runs"].group_keys()) if "runs" in self.group else []

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
        """Hash of what the store holds (model, data, options, committed tokens): keys cached results."""
        a = self.attrs
        key = {"model": a["model"].get("weights_sha256") or a["model"]["spec"], "dataset": a["dataset"]["sha256"],
               "options": a["options"], "tokens": a["progress"]["tokens_committed"], "created": a["created"],
               "runs": self.runs()}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
