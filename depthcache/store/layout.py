"""The activation store: a Zarr v3 group whose layout and root attributes are the depthcache contract.

Layout (schema 1.x, documented in docs/store-format.md and schemas/):

    STORE/                      root group, attrs["depthcache"] = provenance + progress
      resid_pre   (layer, token, d_model)   residual entering each stored layer
      resid_final (token, d_model)          residual after the last layer, before the final norm
      attn_out    (layer, token, d_model)   what attention adds to the residual
      mlp_out     (layer, token, d_model)   what the MLP adds to the residual
      layer       (layer,)                  model layer index of each stored layer
      token_id, doc_id, seq_id, position, next_token_id, next_logprob   (token,)
      item, answer_index, hops              (token,)  task stores only (schema 1.2)
      topk_ids, topk_logprobs               (token, k)
      model/                    final norm parameters, unembedding, tokenizer files
      runs/<name>/              intervention runs (same arrays over a token subset)
      analyses/<name>/          cached analysis results (xarray datasets)

Every array is chunked along tokens in chunks of ``chunk_tokens`` (all layers of a token range in one
chunk), each chunk written exactly once and whole, and checksummed with crc32c.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from depthcache.dtypes import STORED_DTYPES

SCHEMA_VERSION = "1.2"  # 1.1: intervention runs under runs/<name>; 1.2: task stores (item, answer_index, hops)
ATTRS_KEY = "depthcache"
SITES = ("resid", "attn", "mlp")
ROOT_DIMS = ("layer", "token", "d_model", "k")  # results stored inside a store rename these (io.with_private_dims)
SITE_ARRAYS = {"resid": ("resid_pre", "resid_final"), "attn": ("attn_out",), "mlp": ("mlp_out",)}
TARGET_CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_TOKENS = 16


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and dtypes of a store's arrays, fixed when it is created."""

    n_tokens: int
    layers: tuple[int, ...]
    d_model: int
    top_k: int
    sites: tuple[str, ...]
    dtype: str
    chunk_tokens: int
    task: bool = False  # a task store (schema 1.2): also the per-token arrays TASK_ARRAYS

    def activation_arrays(self) -> dict[str, tuple[str, ...]]:
        """Name → dimension names of each activation array this layout stores."""
        dims = {"resid_pre": ("layer", "token", "d_model"), "resid_final": ("token", "d_model"),
                "attn_out": ("layer", "token", "d_model"), "mlp_out": ("layer", "token", "d_model")}
        return {name: dims[name] for site in self.sites for name in SITE_ARRAYS[site]}


TOKEN_ARRAYS: dict[str, str] = {
    "token_id": "int32", "doc_id": "int32", "seq_id": "int32", "position": "int32",
    "next_token_id": "int32", "next_logprob": "float32",
}
# Task stores only: item index, k where the position predicts answer token k (else -1), the item's hops.
TASK_ARRAYS: dict[str, str] = {"item": "int32", "answer_index": "int32", "hops": "int32"}


def choose_chunk_tokens(n_layers: int, d_model: int, itemsize: int) -> int:
    """Largest power of two of tokens whose all-layer chunk stays within TARGET_CHUNK_BYTES."""
    per_token = max(n_layers, 1) * d_model * itemsize
    tokens = MIN_CHUNK_TOKENS
    while tokens * 2 * per_token <= TARGET_CHUNK_BYTES:
        tokens *= 2
    return tokens


def compressors(dtype: str) -> list[Any]:
    """Codecs after serialisation: zstd where it pays (bf16, ints), then the crc32c checksum always."""
    if dtype in ("float16", "float32"):
        return [Crc32cCodec()]  # activations in these dtypes barely compress (storage.md)
    return [ZstdCodec(level=1), Crc32cCodec()]


def create_arrays(group: zarr.Group, layout: StoreLayout) -> None:
    """Create every array of ``layout`` in ``group`` (empty, shapes fixed, chunks along tokens)."""
    n, t = layout.n_tokens, layout.chunk_tokens
    act_dtype = STORED_DTYPES[layout.dtype]
    for name, dims in layout.activation_arrays().items():
        shape = (len(layout.layers), n, layout.d_model) if dims[0] == "layer" else (n, layout.d_model)
        chunks = (len(layout.layers), t, layout.d_model) if dims[0] == "layer" else (t, layout.d_model)
        group.create_array(name, shape=shape, chunks=chunks, dtype=act_dtype, fill_value=0,
                           compressors=compressors(layout.dtype), dimension_names=dims)
    for name, dtype in (TOKEN_ARRAYS | (TASK_ARRAYS if layout.task else {})).items():
        group.create_array(name, shape=(n,), chunks=(t,), dtype=dtype, fill_value=0,
                           compressors=compressors("int32"), dimension_names=("token",))
    for name, dtype in (("topk_ids", "int32"), ("topk_logprobs", "float32")):
        group.create_array(name, shape=(n, layout.top_k), chunks=(t, layout.top_k), dtype=dtype,
                           fill_value=0, compressors=compressors("int32"), dimension_names=("token", "k"))
    if "resid" in layout.sites or "attn" in layout.sites or "mlp" in layout.sites:
        layer = group.create_array("layer", shape=(len(layout.layers),), dtype="int32",
                                   dimension_names=("layer",), compressors=None)
        layer[:] = np.asarray(layout.layers, dtype=np.int32)




