"""The store's ``model/`` group: final norm, unembedding and tokenizer files, so analyses never need the model."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr

from depthcache.errors import DepthcacheError
from depthcache.extract.architectures import architecture_for, final_norm_params, unembedding

MODEL_GROUP = "model"
TOKENIZER_GROUP = "model/tokenizer"
TOKENIZER_SUFFIXES = (".json", ".txt", ".jinja", ".model")


def tokenizer_sha256(files: dict[str, bytes]) -> str:
    """One hash over the tokenizer's files, by sorted name."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "little") + files[name])
    return digest.hexdigest()


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
        arr = tok.create_array(f"file_{i}", shape=(len(data),), dtype="uint8", dimension_names=("byte",))
        arr[:] = np.frombuffer(data, dtype=np.uint8)
        arr.attrs["filename"] = name


def read_head(location: str | Any) -> dict[str, Any]:
    """Final norm (kind, eps, weight, bias) and unembedding (weight, bias) as float32 numpy arrays."""
    group = location if isinstance(location, zarr.Group) else zarr.open_group(str(location), mode="r")
    if MODEL_GROUP not in group:
        raise DepthcacheError("the store has no model/ group (final norm and unembedding); re-extract it")
    model = group[MODEL_GROUP]
    norm = dict(model.attrs["final_norm"])
    return {"norm_kind": norm["kind"], "eps": float(norm["eps"]),
            "norm_weight": model["final_norm_weight"][...],
            "norm_bias": model["final_norm_bias"][...] if norm.get("has_bias") else None,
            "unembed": model["unembed"][...],
            "unembed_bias": model["unembed_bias"][...] if model.attrs.get("unembed_has_bias") else None}


def tokenizer_files(group: zarr.Group) -> dict[str, bytes]:
    """The stored tokenizer files, with names checked so none can escape a folder."""
    files = {}
    for _, arr in sorted(group[TOKENIZER_GROUP].arrays()):
        name = str(arr.attrs.get("filename", ""))
        if PurePosixPath(name).name != name or name.startswith(".") or not name.endswith(TOKENIZER_SUFFIXES):
            raise DepthcacheError(f"store tokenizer file name {name!r} is not allowed")
        files[name] = arr[...].tobytes()
    return files


def load_tokenizer(location: str | Any) -> Any:
    """Rebuild the tokenizer from the store's files, as data only (no remote code)."""
    from transformers import AutoTokenizer

    group = location if isinstance(location, zarr.Group) else zarr.open_group(str(location), mode="r")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in tokenizer_files(group).items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)


def apply_final_norm(h: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """The model's final norm applied to float32 residuals (..., d_model), computed as HF does in float32."""
    h = h.astype(np.float32, copy=False)
    if head["norm_kind"] == "rmsnorm":
        out = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + head["eps"])
        return out * head["norm_weight"]
    centred = h - h.mean(axis=-1, keepdims=True)
    out = centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + head["eps"])
    out = out * head["norm_weight"]
    return out + head["norm_bias"] if head["norm_bias"] is not None else out


def logits_from_residual(h: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """Logit lens: unembedding of the final-normed residual (float32)."""
    logits = apply_final_norm(h, head) @ head["unembed"].T
    return logits + head["unembed_bias"] if head["unembed_bias"] is not None else logits

