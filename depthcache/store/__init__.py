"""The store format: the layout table, atomic IO, validation against the schema, the model head and the reader.

Nothing here imports torch: a store is read, checked and analysed without a model.
"""

from depthcache.store.io import (
    is_url,
    local_name,
    model_display_name,
    open_group,
    read_attrs,
    write_attrs,
    write_dataset_atomically,
)
from depthcache.store.layout import (
                                     ATTRS_KEY,
                                     SCHEMA_VERSION,
                                     SITE_ARRAYS,
                                     SITES,
                                     TASK_ARRAYS,
                                     TOKEN_ARRAYS,
                                     StoreLayout,
)
from depthcache.store.reader import Store, open_dataset
from depthcache.store.schema import check_store, validate_store

__all__ = ["ATTRS_KEY", "SCHEMA_VERSION", "SITES", "SITE_ARRAYS", "Store", "StoreLayout", "TASK_ARRAYS",
           "TOKEN_ARRAYS", "check_store", "is_url", "local_name", "model_display_name", "open_dataset", "open_group", "read_attrs",
           "validate_store", "write_attrs", "write_dataset_atomically"]
