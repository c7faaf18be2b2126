"""The store format: the layout table, atomic IO, validation against the schema, the model head and the reader.

Nothing here imports torch: a store is read, checked and analysed without a model. The names below load on first use,
so a command that only writes a store (``depthcache extract``) does not import xarray.
"""

from typing import Any

_LAZY = {
    **dict.fromkeys(("is_url", "local_name", "model_display_name", "open_group", "read_attrs", "write_attrs",
                     "write_dataset_atomically"),
                    "depthcache.store.io"),
    **dict.fromkeys(("ATTRS_KEY", "SCHEMA_VERSION", "SITE_ARRAYS", "SITES", "TASK_ARRAYS", "TOKEN_ARRAYS",
                     "StoreLayout"), "depthcache.store.layout"),
    **dict.fromkeys(("Store", "open_dataset"), "depthcache.store.reader"),
    **dict.fromkeys(("check_store", "validate_store"), "depthcache.store.schema"),
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'depthcache.store' has no attribute {name!r}")


__all__ = sorted(_LAZY)
