"""Analyses computed from a store alone, out-of-core with Dask: ``run(name, store, **params) -> xr.Dataset``."""

from depthcache.analyze.registry import ANALYSES, analysis, describe, get, load_all
from depthcache.analyze.runner import plot, run
from depthcache.store.reader import Store

__all__ = ["ANALYSES", "Store", "analysis", "describe", "get", "load_all", "plot", "run"]
