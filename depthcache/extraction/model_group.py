"""Write the store's ``model/`` group from a live model: final norm, unembedding and tokenizer files."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from depthcache.model import model_head, structure_of
from depthcache.store.head import MODEL_GROUP, TOKENIZER_GROUP


def _array(group: zarr.Group, name: str, values: np.ndarray, dims: tuple[str, ...]) -> None:
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=dims,
                             chunks=values.shape if values.size else None)
    arr[...] = values



def write_model_group(root: zarr.Group, loaded: Any) -> None:
    """Write the head into ``root/model``: final-norm parameters (the factor it multiplies by, Gemma's 1 + w folded
    in), the unembedding (float32), the logits' scale and soft-cap, and the tokenizer files."""
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
    if head["unembed_bias"] is not None:
        _array(group, "unembed_bias", head["unembed_bias"], ("vocab",))
    tok = root.create_group(TOKENIZER_GROUP)
    for i, (name, data) in enumerate(sorted(loaded.tokenizer_files.items())):
        arr = tok.create_array(f"file_{i}", shape=(len(data),), dtype="uint8", dimension_names=("byte",))
        arr[:] = np.frombuffer(data, dtype=np.uint8)
        arr.attrs["filename"] = name
