"""Write the store's ``model/`` group from a live model: final norm, unembedding and tokenizer files."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from depthcache.model import model_head, onloaded, outer_modules, structure_of
from depthcache.store.head import MODEL_GROUP, TOKENIZER_GROUP
from depthcache.store.layout import TARGET_CHUNK_BYTES, compressors


def row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk shape of a model array: whole rows, as many as fit in TARGET_CHUNK_BYTES (at least one)."""
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, min(shape[0], TARGET_CHUNK_BYTES // max(row_bytes, 1)))
    return (rows, *(max(n, 1) for n in shape[1:]))


def _array(group: zarr.Group, name: str, values: np.ndarray, dims: tuple[str, ...]) -> zarr.Array:
    """One array of the model group, checksummed (crc32c) like every store array and written even where it is
    all zeros, so every chunk exists (a missing chunk would read as zeros)."""
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=dims,
                             chunks=row_chunks(values.shape, values.dtype.itemsize),
                             compressors=compressors(str(values.dtype)), fill_value=0,
                             config={"write_empty_chunks": True})
    arr[...] = values
    return arr


def write_model_group(root: zarr.Group, loaded: Any) -> None:
    """Write the head into ``root/model``: final-norm parameters (the factor it multiplies by, Gemma's 1 + w folded
    in), the unembedding (float32), the logits' scale and soft-cap, and the tokenizer files."""
    with onloaded(outer_modules(loaded.model)):  # a dispatched model's head may be offloaded
        head = model_head(loaded.model, structure_of(loaded.model))
    group = root.create_group(MODEL_GROUP)
    group.attrs["final_norm"] = {"kind": head["norm_kind"], "eps": head["eps"],
                                 "has_bias": head["norm_bias"] is not None}
    group.attrs["unembed_has_bias"] = head["unembed_bias"] is not None
    group.attrs["logit_scale"] = head["logit_scale"]
    group.attrs["logit_softcap"] = head["logit_softcap"]
    _array(group, "final_norm_weight", head["norm_weight"], ("d_model",))
    if head["norm_bias"] is not None:
        _array(group, "final_norm_bias", head["norm_bias"], ("d_model",))
    _array(group, "unembed", head["unembed"], ("vocab", "d_model"))
    if head["transform"] is not None:  # schema 2.3: a BERT-style head's dense, activation and norm
        write_head_transform(group, head["transform"])
    if head["unembed_bias"] is not None:
        _array(group, "unembed_bias", head["unembed_bias"], ("vocab",))
    tok = root.create_group(TOKENIZER_GROUP)
    for i, (name, data) in enumerate(sorted(loaded.tokenizer_files.items())):
        # each file its own dimension (schema 1.3): files of different lengths under one name break xr.open_datatree
        arr = _array(tok, f"file_{i}", np.frombuffer(data, dtype=np.uint8), (f"byte_{i}",))
        arr.attrs["filename"] = name


def write_head_transform(group: zarr.Group, transform: dict[str, Any]) -> None:
    """The head transform's description (``head_transform`` attribute) and arrays (``head_*``)."""
    group.attrs["head_transform"] = {
        "activation": transform["activation"], "norm_kind": transform["norm_kind"], "eps": transform["eps"],
        "dense_has_bias": transform["dense_bias"] is not None, "norm_has_bias": transform["norm_bias"] is not None}
    for name in ("dense_weight", "dense_bias", "norm_weight", "norm_bias"):
        if transform[name] is not None:
            dims = ("d_model", "d_model_in") if name == "dense_weight" else ("d_model",)
            _array(group, f"head_{name}", transform[name], dims)

