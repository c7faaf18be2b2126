"""depthcache: cache a language model's per-layer activations in Zarr and analyse how it uses its depth.

``depthcache.extract(model, texts, out=STORE)`` caches a model's activations (a transformers model with its tokenizer,
or a spec; texts, a ``datasets.Dataset`` or a spec); ``depthcache.open(STORE)`` is the checked way into a store (the
same reader as ``xr.open_dataset(STORE, engine="depthcache")``); ``depthcache.as_float32(ds)`` makes bf16 activations
ready for arithmetic. All load lazily, so ``import depthcache`` stays cheap for the command line.
"""

from typing import Any

from depthcache.codecs import register_bounded_zstd, register_checked_sharding
from depthcache.dtypes import register_bfloat16

register_bfloat16()
register_bounded_zstd()
register_checked_sharding()

__version__ = "0.6.0"

_LAZY = {"open": ("depthcache.store.backend", "open_store"), "as_float32": ("depthcache.store.backend", "as_float32"),
         "extract": ("depthcache.extraction.api", "extract")}


def __getattr__(name: str) -> Any:
    """Import the public API on first use (xarray and zarr are not needed to run ``depthcache --help``)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'depthcache' has no attribute {name!r}")


__all__ = ["__version__", "as_float32", "extract", "open"]
