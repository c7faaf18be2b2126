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
      analyses/<name>/<key>/    cached analysis results, one per parameter set (depthcache.store.results)

Schema 1.x chunks every array along tokens in chunks of ``chunk_tokens`` (all layers of a token range in one
chunk), each chunk written exactly once and whole, and checksummed with crc32c; since schema 1.3 so is every array
of ``model/`` (in chunks of whole rows) and every cached result.

Schema 2.0 shards (Zarr v3 ``sharding_indexed``): an activation array with a layer dimension is one shard object per
``chunk_tokens`` tokens (all layers, written once and whole) holding one inner chunk per layer, so one layer is read
without the others; the arrays without a layer dimension (``resid_final``, the per-token and top-k arrays) hold
``token_shard_tokens`` tokens per shard in inner chunks of ``chunk_tokens``, so no array has more objects than its
bytes / 128 MiB + 1. Every inner chunk ends with its crc32c and so does every shard index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from depthcache.dtypes import BFloat16Bits

SCHEMA_VERSION = "2.3"  # 1.1: runs/<name>; 1.2: task stores (item, answer_index, hops); 1.3: model.structure,
# model head and tokenizer files checksummed (crc32c) and every chunk written, string lengths capped, limits;
# 2.0: sharded arrays (one inner chunk per layer, long shards for the token arrays); 2.1: optional provenance of
# where the model ran (options.model_dtype, options.device_map) and of a multimodal wrapper (structure.language_model);
# 2.2: the branch table (structure.attn/mlp '+'-joined or empty per layer, part_scales, input_norm): attn_out/mlp_out
# are the sums of a layer's token/channel mixers, and a model without MLPs stores no mlp_out; 2.3: a BERT-style head
# transform (structure.head_dense/head_activation/head_norm, model/head_* arrays) between final norm and unembedding
NEWEST_READABLE = {"1": "1.3", "2": SCHEMA_VERSION}  # per major, the newest minor this reader knows (1.x unchanged)
CHECKSUMMED_HEAD = (1, 3)  # the first schema version whose model/ arrays carry crc32c
ATTRS_KEY = "depthcache"
SITES = ("resid", "attn", "mlp")
ROOT_DIMS = ("layer", "token", "d_model", "k")  # results stored inside a store rename these (io.with_private_dims)
TARGET_CHUNK_BYTES = 32 * 2**20  # schema 1.x: one all-layer chunk
MIB = 2**20
DEFAULT_SHARD_MIB = 256  # schema 2.0: one all-layer shard (--shard-mib); the largest power of two of tokens within it
SHARD_MIB_BOUNDS = (1, 1024)  # below 128 a store has more objects than bytes / 128 MiB; 1024: the chunk-size limit
TOKEN_SHARD_BYTES = 128 * MIB  # schema 2.0: least bytes of a resid_final shard (when the store is that long)
MIN_CHUNK_TOKENS = 16


@dataclass(frozen=True)
class ArraySpec:
    """One array of the format: its dims, the site that fills it (activations) and its data type."""

    dims: tuple[str, ...]
    dtype: str  # "activation": the store's --dtype (bfloat16, float16 or float32)
    site: str | None = None  # resid/attn/mlp for activation arrays
    group: str = "base"  # base: every store; task: task stores (1.2); run: skip runs only (1.1)
    doc: str = ""


# THE table of the format: the writer creates these, the schema check expects them, the reader names their dims,
# and docs/store-format.md lists them (a test holds the docs to it).
ARRAYS: dict[str, ArraySpec] = {
    "resid_pre": ArraySpec(("layer", "token", "d_model"), "activation", "resid", doc="residual entering each layer"),
    "resid_final": ArraySpec(("token", "d_model"), "activation", "resid",
                             doc="residual after the last layer, before the final norm"),
    "attn_out": ArraySpec(("layer", "token", "d_model"), "activation", "attn", doc="what attention adds"),
    "mlp_out": ArraySpec(("layer", "token", "d_model"), "activation", "mlp", doc="what the MLP adds"),
    "token_id": ArraySpec(("token",), "int32", doc="input token id"),
    "doc_id": ArraySpec(("token",), "int32", doc="document the token comes from"),
    "seq_id": ArraySpec(("token",), "int32", doc="window (sequence) the token belongs to"),
    "position": ArraySpec(("token",), "int32", doc="position in its window (0: BOS or first token)"),
    "next_token_id": ArraySpec(("token",), "int32", doc="the token that follows (-1: none)"),
    "next_logprob": ArraySpec(("token",), "float32", doc="model log-probability of next_token_id"),
    "topk_ids": ArraySpec(("token", "k"), "int32", doc="the model's top-k next-token ids"),
    "topk_logprobs": ArraySpec(("token", "k"), "float32", doc="their log-probabilities"),
    "item": ArraySpec(("token",), "int32", group="task", doc="task item of the token"),
    "answer_index": ArraySpec(("token",), "int32", group="task",
                              doc="k where the position predicts answer token k, else -1"),
    "hops": ArraySpec(("token",), "int32", group="task", doc="the item's number of hops"),
    "skip_stop": ArraySpec(("token",), "int32", group="run",
                           doc="future variant: t of the token's window in its draw (0: not measured)"),
}
SITE_ARRAYS = {site: tuple(n for n, a in ARRAYS.items() if a.site == site) for site in SITES}
TOKEN_ARRAYS = {n: a.dtype for n, a in ARRAYS.items() if a.site is None and a.group == "base" and a.dims == ("token",)}
TASK_ARRAYS = {n: a.dtype for n, a in ARRAYS.items() if a.group == "task"}
OUTPUT_ARRAYS = tuple(n for n, a in ARRAYS.items() if a.dims == ("token", "k"))


PARTS_SITE = "parts"  # schema 2.2, opt-in (--sites resid,attn,mlp,parts): each branch module apart
PART_PREFIX = "part_"
PART_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
PART_SPEC = ArraySpec(("layer", "token", "d_model"), "activation", PARTS_SITE,
                      doc="what one branch module adds, where a layer has several of a role (part_<module>)")


def is_part(name: str) -> bool:
    """An array of one branch module's part (``part_mamba``), named after a plain module path."""
    return name.startswith(PART_PREFIX) and PART_NAME.fullmatch(name[len(PART_PREFIX):]) is not None


def array_spec(name: str) -> ArraySpec:
    """The table's entry for array ``name``, part arrays included."""
    return PART_SPEC if is_part(name) else ARRAYS[name]


def part_modules(attn: Sequence[str], mlp: Sequence[str]) -> tuple[str, ...]:
    """The branch modules ``--sites parts`` stores apart: every module of a role of which some layer has several
    (Falcon-H1's mamba and self_attn; Granite 4's block_sparse_moe and shared_mlp), in branch-table order."""
    names: list[str] = []
    for table in (attn, mlp):
        if any("+" in entry for entry in table):
            names += [path for entry in table for path in entry.split("+") if PART_NAME.fullmatch(path)]
    return tuple(dict.fromkeys(names))


def absent_roles(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The branch roles (attn, mlp) that no layer of the store's model has, from its branch table (schema 2.2:
    a Mamba model's layers add a mixer and no MLP)."""
    structure = attrs.get("model", {}).get("structure") or {}
    return tuple(role for role in ("attn", "mlp")
                 if isinstance(structure.get(role), list) and structure[role] and not any(structure[role]))


def array_dtype(name: str, activation_dtype: str) -> str:
    """The data type of array ``name`` in a store of activation dtype ``activation_dtype``."""
    dtype = array_spec(name).dtype
    return activation_dtype if dtype == "activation" else dtype


def array_shape(name: str, n_tokens: int, n_layers: int, d_model: int, top_k: int) -> tuple[int, ...]:
    """The shape of array ``name`` from the sizes of its dims."""
    sizes = {"layer": n_layers, "token": n_tokens, "d_model": d_model, "k": top_k}
    return tuple(sizes[d] for d in array_spec(name).dims)


def activation_compressors(zstd_level: int | None) -> list[Any]:
    """Codecs of the activation arrays after serialisation: the crc32c checksum alone by default (zstd saves about
    a fifth of bf16's bytes but costs more CPU than writing them, benchmarks/README.md), zstd first when asked."""
    return [Crc32cCodec()] if zstd_level is None else [ZstdCodec(level=zstd_level), Crc32cCodec()]


def create_array(group: zarr.Group, name: str, layout: StoreLayout) -> None:
    """Create one empty array of the table in ``group``: shape from ``layout``, chunks along tokens (sharded in
    schema 2.0), every chunk checksummed."""
    spec = array_spec(name)
    shape = array_shape(name, layout.n_tokens, len(layout.layers), layout.d_model, layout.top_k)
    chunks = tuple(layout.chunk_tokens if d == "token" else n for d, n in zip(spec.dims, shape))
    shards = None
    if layout.token_shard_tokens is not None:  # 2.0: one inner chunk per layer, a shard per write (or K writes)
        chunks = tuple(1 if d == "layer" else n for d, n in zip(spec.dims, chunks))
        long = "layer" not in spec.dims
        shards = tuple((layout.token_shard_tokens if long else layout.chunk_tokens) if d == "token" else n
                       for d, n in zip(spec.dims, shape))
    dtype = array_dtype(name, layout.dtype)
    codecs = activation_compressors(layout.zstd_level) if spec.dtype == "activation" else compressors("int32")
    zdtype = BFloat16Bits() if dtype == "bfloat16" else dtype  # bf16's metadata made without ml_dtypes, same JSON
    group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=zdtype, fill_value=0,
                       compressors=codecs, dimension_names=spec.dims)


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
    zstd_level: int | None = None  # activations: crc32c only (None), or zstd at this level first
    token_shard_tokens: int | None = None  # 2.0: tokens per shard of the arrays without a layer dim (None: 1.x)
    parts: tuple[str, ...] = ()  # 2.2: the branch modules stored apart (site "parts"), see ``part_modules``

    def activation_arrays(self) -> dict[str, tuple[str, ...]]:
        """Name → dimension names of each activation array this layout stores."""
        return {name: array_spec(name).dims for name in site_arrays(self.sites, self.parts)}


def site_arrays(sites: Sequence[str], parts: Sequence[str] = ()) -> tuple[str, ...]:
    """The activation arrays of a site list, in the store's order (``parts``: the modules of site "parts")."""
    return tuple(name for site in sites
                 for name in ((PART_PREFIX + p for p in parts) if site == PARTS_SITE else SITE_ARRAYS[site]))


def choose_chunk_tokens(n_layers: int, d_model: int, itemsize: int, n_tokens: int | None = None,
                        target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Largest power of two of tokens whose all-layer chunk (2.0: shard) stays within ``target_bytes``, and never
    more than the store's ``n_tokens`` (a chunk longer than the store would only store fill values)."""
    per_token = max(n_layers, 1) * d_model * itemsize
    tokens = MIN_CHUNK_TOKENS
    while tokens * 2 * per_token <= target_bytes:
        tokens *= 2
    return tokens if n_tokens is None else max(1, min(tokens, n_tokens))


def choose_token_shard_tokens(chunk_tokens: int, d_model: int, itemsize: int, n_tokens: int) -> int:
    """Tokens per shard of the arrays without a layer dimension (2.0): whole chunks, enough that a ``resid_final``
    shard holds at least TOKEN_SHARD_BYTES, and no more chunks than the store has."""
    per_chunk = chunk_tokens * d_model * itemsize
    chunks = min(-(-TOKEN_SHARD_BYTES // per_chunk), -(-n_tokens // chunk_tokens))
    return max(1, chunks) * chunk_tokens


def layout_units(layout: dict[str, Any]) -> tuple[int, int]:
    """(chunk_tokens, worker unit) of a store's ``layout`` attributes: every write covers whole chunks, and a
    worker owns whole token shards (2.0; in 1.x stores the chunk)."""
    chunk = int(layout["chunk_tokens"])
    return chunk, int(layout.get("token_shard_tokens", chunk))


def compressors(dtype: str) -> list[Any]:
    """Codecs after serialisation: zstd where it pays (bf16, ints), then the crc32c checksum always."""
    if dtype in ("float16", "float32"):
        return [Crc32cCodec()]  # activations in these dtypes barely compress (docs/store-format.md)
    return [ZstdCodec(level=1), Crc32cCodec()]


def create_arrays(group: zarr.Group, layout: StoreLayout) -> None:
    """Create every array of ``layout`` in ``group`` (empty, shapes fixed, chunks along tokens)."""
    for name in layout.activation_arrays():
        create_array(group, name, layout)
    for name in (*TOKEN_ARRAYS, *(TASK_ARRAYS if layout.task else ()), *OUTPUT_ARRAYS):
        create_array(group, name, layout)
    if layout.sites:
        layer = group.create_array("layer", shape=(len(layout.layers),), dtype="int32",
                                   dimension_names=("layer",), compressors=[Crc32cCodec()])  # 1.3: checksummed
        layer[:] = np.asarray(layout.layers, dtype=np.int32)


def shard_index_bytes(meta: dict[str, Any]) -> int | None:
    """Size of the index at the end of each shard of a sharded array (its zarr.json as a dict) whose inner chunks
    and index both end with crc32c; None for any other array."""
    codecs = meta.get("codecs")
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)
            and codecs[0].get("name") == "sharding_indexed"):
        return None
    config = codecs[0].get("configuration") or {}
    try:
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        inner = [int(c) for c in config["chunk_shape"]]
        per_shard = math.prod(int(g) // c for g, c in zip(grid, inner))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    checked = is_checksummed(config.get("codecs")) and is_checksummed(config.get("index_codecs"))
    return 16 * per_shard + 4 if checked and config.get("index_location", "end") == "end" else None


def is_checksummed(codecs: Sequence[Any] | None) -> bool:
    """True if an array's codecs (dicts from its zarr.json, or codec objects) end with crc32c: every chunk carries
    its checksum."""
    last = codecs[-1] if codecs else None
    return isinstance(last, Crc32cCodec) or (isinstance(last, dict) and last.get("name") == "crc32c")
