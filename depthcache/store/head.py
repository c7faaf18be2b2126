"""The store's ``model/`` group: final norm, unembedding and tokenizer files, so analyses never need the model."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr

from depthcache.errors import DepthcacheError

MODEL_GROUP = "model"
TOKENIZER_GROUP = "model/tokenizer"
TOKENIZER_SUFFIXES = (".json", ".txt", ".jinja", ".model")
MAX_TOKENIZER_FILE_BYTES = 2**28


def tokenizer_sha256(files: dict[str, bytes]) -> str:
    """One hash over the tokenizer's files, by sorted name."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "little") + files[name])
    return digest.hexdigest()


def read_head(location: str | Any, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final norm (kind, eps, weight, bias), unembedding (weight, bias) as float32 numpy arrays, and the logits'
    scale and soft-cap (1 and none in stores before schema 1.3).

    Shapes and types are checked against the store's attributes before anything is read (stores are untrusted)."""
    group = location if isinstance(location, zarr.Group) else zarr.open_group(str(location), mode="r")
    if MODEL_GROUP not in group:
        raise DepthcacheError("the store has no model/ group (final norm and unembedding); re-extract it")
    from depthcache.store.schema import (  # schemas imports the store module
        check_store,
        unreadable_metadata_as_error,
    )

    attrs = check_store(group) if attrs is None else attrs
    with unreadable_metadata_as_error(group):
        model = group[MODEL_GROUP]
        norm, has_unembed_bias = head_attrs(model)
        scale, softcap = logit_attrs(model)
        d_model, vocab = int(attrs["model"]["d_model"]), int(attrs["model"]["vocab_size"])
        expected = {"final_norm_weight": (d_model,), "unembed": (vocab, d_model)}
        expected |= {"final_norm_bias": (d_model,)} if norm["has_bias"] else {}
        expected |= {"unembed_bias": (vocab,)} if has_unembed_bias else {}
        arrays = {name: checked_array(model, name, shape) for name, shape in expected.items()}
    return {"norm_kind": norm["kind"], "eps": float(norm["eps"]),
            "norm_weight": arrays["final_norm_weight"], "norm_bias": arrays.get("final_norm_bias"),
            "unembed": arrays["unembed"], "unembed_bias": arrays.get("unembed_bias"),
            "logit_scale": scale, "logit_softcap": softcap}


def head_attrs(model: zarr.Group) -> tuple[dict[str, Any], bool]:
    """The model group's final-norm description and unembedding-bias flag, type-checked."""
    norm = model.attrs.get("final_norm")
    bias = model.attrs.get("unembed_has_bias", False)
    if (not isinstance(norm, dict) or norm.get("kind") not in ("rmsnorm", "layernorm")
            or not isinstance(norm.get("eps"), (int, float)) or isinstance(norm.get("eps"), bool)
            or not isinstance(norm.get("has_bias", False), bool) or not isinstance(bias, bool)):
        raise DepthcacheError("the store's model/ attributes (final_norm, unembed_has_bias) are malformed; "
                              "re-extract the store")
    return {"kind": norm["kind"], "eps": norm["eps"], "has_bias": norm.get("has_bias", False)}, bias


def logit_attrs(model: zarr.Group) -> tuple[float, float | None]:
    """The model group's logit scale and soft-cap (schema 1.3; defaults 1 and None), type-checked."""
    scale = model.attrs.get("logit_scale", 1.0)
    softcap = model.attrs.get("logit_softcap")
    if (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0
            or not (softcap is None or (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                        and math.isfinite(softcap) and softcap > 0))):
        raise DepthcacheError("the store's model/ attributes (logit_scale, logit_softcap) are malformed; "
                              "re-extract the store")
    return float(scale), (None if softcap is None else float(softcap))


def physical_memory() -> int:
    """Bytes of RAM on this machine (a bound on what a store may make us allocate)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def checked_array(group: zarr.Group, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read a float32 array of the model group after checking its shape and type (before allocating it)."""
    if name not in group.array_keys():
        raise DepthcacheError(f"the store's model/ group lacks {name}; re-extract the store")
    array = group[name]
    if 4 * math.prod(shape) > physical_memory() // 2:
        raise DepthcacheError(f"the store's model/{name} of shape {shape} would take more than half of this "
                              "machine's memory")
    if tuple(array.shape) != shape or array.dtype != np.float32:
        raise DepthcacheError(f"the store's model/{name} is {array.dtype} {tuple(array.shape)}, expected float32 "
                              f"{shape} from the store's attributes")
    if not name.endswith("_bias") and array.nchunks_initialized < array.nchunks:  # absent chunks read as zeros
        raise DepthcacheError(f"the store's model/{name} has missing chunks; copy or re-extract the store")
    try:
        values = array[...]
    except Exception as exc:  # noqa: BLE001 - corrupt untrusted bytes may fail any codec in any way
        raise DepthcacheError(f"the store's model/{name} is corrupt ({type(exc).__name__}: {exc}); copy or "
                              "re-extract the store") from exc
    if not np.isfinite(values).all():
        raise DepthcacheError(f"the store's model/{name} holds non-finite values")
    return values


def tokenizer_files(group: zarr.Group) -> dict[str, bytes]:
    """The stored tokenizer files, with names checked so none can escape a folder."""
    files = {}
    for _, arr in sorted(group[TOKENIZER_GROUP].arrays()):
        name = arr.attrs.get("filename", "")
        if (not isinstance(name, str) or PurePosixPath(name).name != name or "\\" in name or name.startswith(".")
                or not name.endswith(TOKENIZER_SUFFIXES) or name in files):
            raise DepthcacheError(f"store tokenizer file name {name!r} is not allowed")
        if arr.ndim != 1 or arr.dtype != np.uint8 or arr.shape[0] > MAX_TOKENIZER_FILE_BYTES:
            raise DepthcacheError(f"store tokenizer file {name!r} is {arr.dtype} {arr.shape}, expected uint8 bytes "
                                  f"of at most {MAX_TOKENIZER_FILE_BYTES} bytes")
        files[name] = arr[...].tobytes()
    return files


def load_tokenizer(location: str | Any) -> Any:
    """Rebuild the tokenizer from the store's JSON files, as data only: the fast tokenizer, never code or pickles."""
    from transformers import PreTrainedTokenizerFast

    group = location if isinstance(location, zarr.Group) else zarr.open_group(str(location), mode="r")
    files = tokenizer_files(group)
    if "tokenizer.json" not in files:
        raise DepthcacheError("the store's tokenizer has no tokenizer.json (only fast tokenizers load from stores)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return PreTrainedTokenizerFast.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - untrusted JSON may break the tokenizer parser in any way
            raise DepthcacheError(f"the store's tokenizer files do not load ({type(exc).__name__}: {exc})") from exc


def apply_final_norm(h: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """The model's final norm applied to float32 residuals (..., d_model), computed as HF does in float32 (the
    stored weight is the factor the norm multiplies by: Gemma's 1 + w is folded in)."""
    h = h.astype(np.float32, copy=False)
    if head["norm_kind"] == "rmsnorm":
        out = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + head["eps"])
        return out * head["norm_weight"]
    centred = h - h.mean(axis=-1, keepdims=True)
    out = centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + head["eps"])
    out = out * head["norm_weight"]
    return out + head["norm_bias"] if head["norm_bias"] is not None else out


def logits_from_residual(h: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """Logit lens: the model's output transform of the unembedded, final-normed residual (float32): times the logit
    scale (Cohere, Granite), then soft-capped as cap·tanh(logits/cap) (Gemma 2)."""
    logits = apply_final_norm(h, head) @ head["unembed"].T
    if head["unembed_bias"] is not None:
        logits = logits + head["unembed_bias"]
    if head.get("logit_scale", 1.0) != 1.0:
        logits = logits * np.float32(head["logit_scale"])
    cap = head.get("logit_softcap")
    return logits if cap is None else np.float32(cap) * np.tanh(logits / np.float32(cap))

