"""Running an analysis: scheduler choice, cached results under ``analyses/<name>``, and plots."""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
import xarray as xr
import zarr

import depthcache
from depthcache.analyze.registry import check_params, get
from depthcache.errors import DepthcacheError
from depthcache.store.io import is_url, local_name, open_result, write_dataset_atomically
from depthcache.store.layout import ROOT_DIMS
from depthcache.store.reader import Store

RESULT_ATTR = "depthcache_analysis"
SCHEDULER_ENV = "DEPTHCACHE_SCHEDULER"
MAX_RESULT_BYTES = 2**30  # a cached result larger than this is not loaded (stores are untrusted)


@contextmanager
def scheduler(address: str | None = None) -> Iterator[None]:
    """Dask's threaded scheduler by default; a dask.distributed cluster at ``address`` (or $DEPTHCACHE_SCHEDULER).

    Threads get one BLAS thread each, as distributed workers do: OpenBLAS's float32 GEMM rounds differently with
    another thread count, and results must not depend on the scheduler."""
    from threadpoolctl import threadpool_limits

    address = address or os.environ.get(SCHEDULER_ENV)
    if not address:
        with dask.config.set(scheduler="threads"), threadpool_limits(1):
            yield
        return
    from distributed import Client

    try:
        client = Client(address, timeout="10s", set_as_default=True)
    except (OSError, TimeoutError) as exc:
        raise DepthcacheError(f"cannot reach the dask scheduler at {address}: {exc}") from exc
    with client:
        yield


def writable(location: str) -> bool:
    """True if results can be written inside a local store."""
    if is_url(location):
        return False
    try:
        with tempfile.TemporaryFile(dir=location):
            return True
    except OSError:
        return False


def result_path(store: Store, name: str, results_dir: str | None = None) -> tuple[str, str | None]:
    """(zarr location, group) where the result of ``name`` on ``store`` is cached."""
    if results_dir:
        return str(Path(results_dir) / f"{name}.zarr"), None
    if writable(store.location):
        return store.location, f"analyses/{name}"
    here = local_name(store.location)  # a remote store's results go to a local folder named after it
    return str(here.with_name(f"{here.name}.analyses") / f"{name}.zarr"), None


def canonical(params: dict[str, Any]) -> str:
    """Parameters as sorted JSON: equal parameters, equal string."""
    return json.dumps(params, sort_keys=True, default=str)


def provenance(name: str, stores: list[Store], params: dict[str, Any]) -> dict[str, Any]:
    """What identifies a result: analysis, parameters, source stores, code version."""
    return {"name": name, "params": json.loads(canonical(params)), "sources": [s.identity for s in stores],
            "source_locations": [s.location for s in stores], "code_version": depthcache.__version__}


def load_cached(location: str, group: str | None, expected: dict[str, Any]) -> xr.Dataset | None:
    """The cached result if it exists and was computed from the same stores with the same parameters."""
    try:
        ds = open_result(location, group)
    except (FileNotFoundError, KeyError, OSError, ValueError):
        return None
    try:
        meta = json.loads(ds.attrs.get(RESULT_ATTR, "{}"))
        same = all(meta.get(k) == expected[k] for k in ("name", "params", "sources", "code_version"))
    except (ValueError, TypeError, AttributeError):  # a damaged cached result is recomputed
        return None
    return ds.load() if same and ds.nbytes <= MAX_RESULT_BYTES else None


def save(result: xr.Dataset, location: str, group: str | None) -> None:
    """Write a computed result; on a local store via a temporary group renamed into place (never partial)."""
    folder = Path(location) / group if group else Path(location)
    if group and "/" in group:  # make the parent (e.g. analyses/) a real zarr group, not a bare folder
        zarr.open_group(location, mode="r+").require_group(group.rsplit("/", 1)[0])
    write_dataset_atomically(result, folder, avoid_dims=ROOT_DIMS if group else ())


def corruption_error(stores: list[Store], exc: Exception) -> DepthcacheError:
    """An error naming the array and token chunk that failed its checksum (found by re-reading every chunk)."""
    from depthcache.store.schema import chunk_problems

    found = []
    for store in stores:
        for path in [None, *(f"runs/{r}" for r in store.runs())]:
            group = store.group if path is None else store.group[path]
            names = [n for n, a in group.arrays() if "token" in (a.metadata.dimension_names or ())]
            tokens = int(group.attrs["depthcache"]["progress"]["tokens_committed"])
            found += [f"{store.location}{'/' + path if path else ''}: {p}"
                      for p in chunk_problems(group, sorted(names), tokens)]
    where = "; ".join(found[:3]) or f"a chunk failed its checksum ({exc})"
    return DepthcacheError(f"corrupt data, nothing saved: {where}. Re-extract or copy the store again "
                           "(depthcache validate STORE lists every bad chunk)")


def result_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the analysis's defaults filled in, as stored (JSON round trip)."""
    signature = inspect.signature(get(name).compute)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return json.loads(canonical(defaults | params))


def cached_result(name: str, store: Store, params: dict[str, Any] | None = None,
                  results_dir: str | None = None) -> xr.Dataset | None:
    """The saved result of ``name`` computed from ``store`` by this code version with ``params`` (defaults filled
    in on both sides; None: any parameters), or None."""
    location, group = result_path(store, name, results_dir)
    try:
        ds = open_result(location, group)
        meta = json.loads(ds.attrs.get(RESULT_ATTR, "{}"))
    except (FileNotFoundError, KeyError, OSError, ValueError, TypeError):
        return None
    if meta.get("name") != name or meta.get("sources") != [store.identity] or \
            meta.get("code_version") != depthcache.__version__:
        return None
    if params is not None and result_params(name, meta.get("params", {})) != result_params(name, params):
        return None
    return ds.load()


def run(name: str, *locations: str | Store, force: bool = False, scheduler_address: str | None = None,
        results_dir: str | None = None, storage_options: dict[str, Any] | None = None, **params: Any) -> xr.Dataset:
    """Compute analysis ``name`` on the given store(s), or return its cached result; saves what it computes."""
    spec = get(name)
    stores = [loc if isinstance(loc, Store) else Store(str(loc), dict(storage_options or {})) for loc in locations]
    if len(stores) != spec.n_stores:
        raise DepthcacheError(f"analysis {name!r} takes {spec.n_stores} store(s), got {len(stores)}")
    check_params(spec, params)
    expected = provenance(name, stores, params)
    location, group = result_path(stores[-1], name, results_dir)
    if not force and (cached := load_cached(location, group, expected)) is not None:
        return cached
    with scheduler(scheduler_address):
        try:
            result = spec.compute(*stores, **params).compute()
        except ValueError as exc:
            if "checksum" not in str(exc):
                raise
            raise corruption_error(stores, exc) from exc
    result.attrs[RESULT_ATTR] = json.dumps(expected | {"created": datetime.now(timezone.utc).isoformat()})
    save(result, location, group)
    return result


def plot(name: str, *locations: str, out_dir: str | None = None, **run_kwargs: Any) -> list[Path]:
    """Draw the figures of analysis ``name`` (computing or reusing its result); returns the PNG paths."""
    spec = get(name)
    if spec.plot is None:
        raise DepthcacheError(f"analysis {name!r} has no plot")
    result = run(name, *locations, **run_kwargs)
    here = local_name(str(locations[-1]))
    folder = Path(out_dir) if out_dir else here.with_name(f"{here.name.removesuffix('.zarr')}.plots")
    folder.mkdir(parents=True, exist_ok=True)
    return spec.plot(result, folder)
