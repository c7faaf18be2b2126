"""A group's arrays opened from their zarr.json documents, bfloat16 arrays as their uint16 bit patterns.

zarr's own metadata objects of a bfloat16 array import ml_dtypes (about a second of start-up) to parse the fill
value and to name the dtype; the writer, the store check and the analyses' reader only need the chunk bytes, so they
open bf16 arrays as ``BFloat16Bits`` (the same data type on disk, uint16 values in memory) and widen the bits
themselves where values are needed (an exact shift: a bf16 value is the upper half of the float32 with that value).
"""

from __future__ import annotations

from typing import Any

import zarr
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync

from depthcache.dtypes import BFloat16Bits
from depthcache.store.io import METADATA, parse_json


async def _documents(group: zarr.Group) -> dict[str, Any]:
    children = [key async for key in group.store.list_dir(group.path) if key != METADATA]
    found = {}
    for name in children:
        raw = await (group.store_path / name / METADATA).get(prototype=default_buffer_prototype())
        if raw is not None:
            found[name] = parse_json(raw.to_bytes(), f"{name}/{METADATA}")
    return found


def array_documents(group: zarr.Group) -> dict[str, dict[str, Any]]:
    """Name → zarr.json document of every array directly in ``group``, read as JSON through the group's store (local
    or remote), each once (every read is a request on object storage)."""
    return {name: doc for name, doc in sync(_documents(group)).items()
            if isinstance(doc, dict) and doc.get("node_type") == "array"}


def open_array(group: zarr.Group, name: str, document: dict[str, Any],
               config: dict[str, Any] | None = None) -> zarr.Array:
    """Array ``name`` of ``group`` from its zarr.json ``document``; a bfloat16 array as ``BFloat16Bits``."""
    if document.get("data_type") != "bfloat16":
        metadata = ArrayV3Metadata.from_dict(document)
    else:
        bits = BFloat16Bits()
        metadata = ArrayV3Metadata(
            shape=document["shape"], data_type=bits, chunk_grid=document["chunk_grid"],
            chunk_key_encoding=document["chunk_key_encoding"],
            fill_value=bits.from_json_scalar(document["fill_value"], zarr_format=3), codecs=document["codecs"],
            attributes=document.get("attributes"), dimension_names=document.get("dimension_names"),
            storage_transformers=document.get("storage_transformers"))
    return zarr.Array(AsyncArray(metadata, store_path=group.store_path / name, config=config))


def open_arrays(group: zarr.Group, config: dict[str, Any] | None = None) -> dict[str, zarr.Array]:
    """Every array directly in ``group`` (see ``open_array``), by name."""
    return {name: open_array(group, name, doc, config) for name, doc in array_documents(group).items()}


def holds_bits(array: zarr.Array) -> bool:
    """Whether ``array`` gives bfloat16 values as their uint16 bit patterns."""
    return isinstance(array.metadata.data_type, BFloat16Bits)
