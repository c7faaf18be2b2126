"""Running an analysis: scheduler choice, the results cache (depthcache.store.results), and plots."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import numpy as np
import xarray as xr
from dask.local import get_sync

from depthcache.analyze.registry import Analysis, check_params, get, parameters
from depthcache.errors import DepthcacheError
from depthcache.store import results
from depthcache.store.io import local_name
from depthcache.store.reader import Store

SCHEDULER_ENV = "DEPTHCACHE_SCHEDULER"


@dataclass(frozen=True)
class Context:
    """What an analysis computed inside another one inherits from the outer call: results folder, scheduler."""

    results_dir: str | None
    scheduler_address: str | None


CONTEXT: ContextVar[Context | None] = ContextVar("depthcache_analysis_context", default=None)


@contextmanager
def scheduler(address: str | None = None) -> Iterator[None]:
    """Dask's threaded scheduler by default; a dask.distributed cluster at ``address`` (or $DEPTHCACHE_SCHEDULER).

    Threads get one BLAS thread each, as distributed workers do: OpenBLAS's float32 GEMM rounds differently with
    another thread count, and results must not depend on the scheduler."""
    from threadpoolctl import threadpool_limits

    address = address or os.environ.get(SCHEDULER_ENV)
    if not address:
        # the threaded scheduler's function, not its name: given a name, dask imports distributed (a second or so)
        # to look for a client first; the function is what the name resolves to.
        with dask.config.set(scheduler=dask.threaded.get), threadpool_limits(1):
            yield
        return
    from distributed import Client

    try:
        client = Client(address, timeout="10s", set_as_default=True)
    except (OSError, TimeoutError) as exc:
        raise DepthcacheError(f"cannot reach the dask scheduler at {address}: {exc}") from exc
    with client:
        yield


def corruption_error(stores: list[Store], exc: Exception) -> DepthcacheError | None:
    """An error naming the array and token chunk that failed to decode or checksum (found by re-reading every
    chunk); None when every chunk reads cleanly (the failure was not the data's)."""
    from depthcache.store.schema import chunk_problems

    found = []
    for store in stores:
        for path in [None, *(f"runs/{r}" for r in store.runs())]:
            group = store.group if path is None else store.group[path]
            names = [n for n, a in group.arrays() if "token" in (a.metadata.dimension_names or ())]
            tokens = int(group.attrs["depthcache"]["progress"]["tokens_committed"])
            found += [f"{store.location}{'/' + path if path else ''}: {p}"
                      for p in chunk_problems(group, sorted(names), tokens)]
    if not found and "checksum" not in str(exc):
        return None
    where = "; ".join(found[:3]) or f"a chunk failed its checksum ({exc})"
    return DepthcacheError(f"corrupt data, nothing saved: {where}. Re-extract or copy the store again "
                           "(depthcache validate STORE lists every bad chunk)")


def result_params(spec: Analysis, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the analysis's defaults filled in, as stored (JSON round trip): the key of a cached result."""
    signature = inspect.signature(spec.compute)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return json.loads(results.canonical(defaults | params))


def open_stores(locations: tuple[str | Store, ...], storage_options: dict[str, Any] | None) -> list[Store]:
    """Stores from locations (Store objects pass through)."""
    return [loc if isinstance(loc, Store) else Store(str(loc), dict(storage_options or {})) for loc in locations]


def checked(name: str, locations: tuple[str | Store, ...], storage_options: dict[str, Any] | None,
            params: dict[str, Any]) -> tuple[Analysis, list[Store], dict[str, Any]]:
    """The analysis, its opened stores and its full parameters, after checking the store count and parameters."""
    spec = get(name)
    stores = open_stores(locations, storage_options)
    if len(stores) != spec.n_stores:
        raise DepthcacheError(f"analysis {name!r} takes {spec.n_stores} store(s), got {len(stores)}")
    check_params(spec, params)
    return spec, stores, result_params(spec, params)


def first_used_token(store: Store, first: int) -> int | None:
    """Index of the store's first token at window position ``first`` or later, or None if there is none; read chunk
    by chunk, stopping at the first found (in the first chunk of any real store)."""
    position = store.ds.position.data
    start = 0
    for index in range(position.numblocks[0]):
        block = position.blocks[index].compute(scheduler=get_sync)  # a function: a name would import distributed
        if len(hits := np.flatnonzero(block >= first)):
            return start + int(hits[0])
        start += len(block)
    return None


def require_tokens(spec: Analysis, stores: list[Store], params: dict[str, Any]) -> None:
    """Refuse, before computing, parameters under which an analysis would use no token (its result would be NaN):
    position 0 of every window left out and ``max_tokens`` ending before position 1, or windows of one token."""
    if "include_first" not in parameters(spec):
        return
    store, first, limit = stores[-1], 0 if params["include_first"] else 1, params.get("max_tokens")
    used = first_used_token(store, first)
    if used is None:
        raise DepthcacheError(f"{spec.name} with include_first=false uses no token: every window of "
                              f"{store.location} is one token long (position 0, left out); pass -p include_first=true")
    if limit is not None and used >= limit:
        raise DepthcacheError(f"{spec.name} with max_tokens={limit} uses no token: position 0 of each window is left "
                              f"out (include_first=false) and the first token at a later position is token {used}; "
                              f"pass -p max_tokens={used + 1} or more, or -p include_first=true")


def cached(name: str, *locations: str | Store, results_dir: str | None = None,
           storage_options: dict[str, Any] | None = None, **params: Any) -> xr.Dataset | None:
    """The cached result of ``name`` with ``params`` (defaults filled in) on the stores as they are now, or None."""
    _, stores, full = checked(name, locations, storage_options, params)
    return results.lookup(name, full, stores, inherited(results_dir, None)[0])


def inherited(results_dir: str | None, scheduler_address: str | None) -> tuple[str | None, str | None]:
    """The results folder and scheduler of this call, else of the analysis this one is computed inside."""
    outer = CONTEXT.get()
    if outer is None:
        return results_dir, scheduler_address
    return results_dir or outer.results_dir, scheduler_address or outer.scheduler_address


def compute(spec: Analysis, stores: list[Store], params: dict[str, Any]) -> tuple[xr.Dataset, list[bool]]:
    """The computed result and, per store, whether the analysis looked at its intervention runs."""
    before = [s.runs_read for s in stores]
    for s in stores:
        s.runs_read = False
    try:
        result = spec.compute(*stores, **params).compute()
    except (ValueError, RuntimeError) as exc:  # a chunk that fails to decode: find and name it
        corrupt = corruption_error(stores, exc)
        if corrupt is None:
            raise
        raise corrupt from exc
    finally:
        read = [s.runs_read for s in stores]
        for s, was in zip(stores, before):
            s.runs_read = was or s.runs_read
    return result, read


def run(name: str, *locations: str | Store, force: bool = False, scheduler_address: str | None = None,
        results_dir: str | None = None, storage_options: dict[str, Any] | None = None, **params: Any) -> xr.Dataset:
    """Compute analysis ``name`` on the given store(s), or return its cached result; saves what it computes.

    Analyses computed inside another one (effective-depth reads contributions and logit-lens) inherit its results
    folder and scheduler."""
    if name == "layer-map" and len(locations) == 1:  # a statistics folder of depthcache map-stats: fitted alone
        from depthcache.analyze.layer_map import fitted_statistics

        with scheduler(scheduler_address):
            return fitted_statistics(str(locations[0]), force, **params)
    spec, stores, full = checked(name, locations, storage_options, params)
    results_dir, scheduler_address = inherited(results_dir, scheduler_address)
    empty = [s.location for s in stores if int(s.attrs["progress"]["tokens_committed"]) == 0]
    if empty:
        raise DepthcacheError(f"{empty[0]} has no committed tokens yet (nothing to analyse): finish its extraction "
                              "with depthcache extract ... --resume")
    require_tokens(spec, stores, full)
    hit, damage = results.find(name, full, stores, results_dir) if not force else (None, None)
    if hit is not None:
        return hit
    results.require_writable_place(stores[-1], results_dir, damage)  # before computing, not after
    nested = CONTEXT.get() is not None
    token = CONTEXT.set(Context(results_dir, scheduler_address))
    try:
        if nested:  # already inside the outer analysis's scheduler
            result, read = compute(spec, stores, params)
        else:
            with scheduler(scheduler_address):
                result, read = compute(spec, stores, params)
    finally:
        CONTEXT.reset(token)
    meta = results.provenance(name, full, stores, read) | {"created": datetime.now(timezone.utc).isoformat()}
    results.save(result, meta, stores[-1], results_dir)
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
