"""Write the store's ``model/`` group from a live model: final norm, unembedding and tokenizer files."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from depthcache.model import architecture_for, final_norm_params, unembedding
from depthcache.store.head import MODEL_GROUP, TOKENIZER_GROUP


def _array(group: zarr.Group, name: str, values: np.ndarray, dims: tuple[str, ...]) -> None:
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=dims,
                             chunks=values.shape if values.size else None)
    arr[...] = values



def write_model_group(root: zarr.Group, loaded: Any) -> None:
    """Write final-norm parameters, the unembedding (float32) and the tokenizer files into ``root/model``."""
    model = loaded.model
    norm = final_norm_params(model, architecture_for(model))
    weight, bias = unembedding(model)
    group = root.create_group(MODEL_GROUP)
    group.attrs["final_norm"] = {"kind": norm["kind"], "eps": norm["eps"], "has_bias": norm["bias"] is not None}
    group.attrs["unembed_has_bias"] = bias is not None
    _array(group, "final_norm_weight", norm["weight"].numpy(), ("d_model",))
    if norm["bias"] is not None:
        _array(group, "final_norm_bias", norm["bias"].numpy(), ("d_model",))
    _array(group, "unembed", weight.numpy(), ("vocab", "d_model"))
    if bias is not None:
        _array(group, "unembed_bias", bias.numpy(), ("vocab",))
    tok = root.create_group(TOKENIZER_GROUP)
    for i, (name, data) in enumerate(sorted(loaded.tokenizer_files.items())):
        # each file its own dimension (schema 1.3): files of different lengths under one name break xr.open_datatree
        arr = tok.create_array(f"file_{i}", shape=(len(data),), dtype="uint8", dimension_names=(f"byte_{i}",))
        arr[:] = np.frombuffer(data, dtype=np.uint8)
        arr.attrs["filename"] = name
