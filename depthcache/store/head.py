"""The store's ``model/`` group: final norm, unembedding and tokenizer files, so analyses never need the model."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr

from depthcache.errors import DepthcacheError
from depthcache.limits import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_TOKENIZER_BYTES,
    MAX_TOKENIZER_FILES,
    max_object_bytes,
)
from depthcache.store.io import version_tuple
from depthcache.store.layout import CHECKSUMMED_HEAD, is_checksummed
from depthcache.store.problems import Problems, chunk_key, grid_coords, grid_problems

MODEL_GROUP = "model"
TOKENIZER_GROUP = "model/tokenizer"
TOKENIZER_SUFFIXES = (".json", ".txt", ".jinja", ".model")
MAX_FILENAME = 255
UNCHECKSUMMED_NOTE = "model head not checksummed (schema < 1.3): its bytes cannot be verified; re-extract to get one"


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
    from depthcache.store.io import open_group

    group = location if isinstance(location, zarr.Group) else open_group(str(location), "r")
    if MODEL_GROUP not in group:
        raise DepthcacheError("the store has no model/ group (final norm and unembedding); re-extract it")
    from depthcache.store.schema import (  # schemas imports the store module
        check_store,
        unreadable_metadata_as_error,
    )

    attrs = check_store(group) if attrs is None else attrs
    with unreadable_metadata_as_error(group):
        model = group[MODEL_GROUP]
        norm, _ = head_attrs(model)
        scale, softcap = logit_attrs(model)
        transform = transform_attrs(model)
        arrays = {name: checked_array(model, name, shape, every_chunk_written(attrs))
                  for name, shape in head_shapes(model, attrs).items()}
    return {"norm_kind": norm["kind"], "eps": float(norm["eps"]),
            "norm_weight": arrays["final_norm_weight"], "norm_bias": arrays.get("final_norm_bias"),
            "unembed": arrays["unembed"], "unembed_bias": arrays.get("unembed_bias"),
            "logit_scale": scale, "logit_softcap": softcap,
            "transform": None if transform is None else {
                "activation": transform["activation"], "norm_kind": transform["norm_kind"],
                "eps": float(transform["eps"]), "dense_weight": arrays["head_dense_weight"],
                "dense_bias": arrays.get("head_dense_bias"), "norm_weight": arrays["head_norm_weight"],
                "norm_bias": arrays.get("head_norm_bias")}}


def head_shapes(model: zarr.Group, attrs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name → shape of every array of the model head, from the store's and the model group's attributes."""
    norm, has_unembed_bias = head_attrs(model)
    d_model, vocab = int(attrs["model"]["d_model"]), int(attrs["model"]["vocab_size"])
    expected = {"final_norm_weight": (d_model,), "unembed": (vocab, d_model)}
    expected |= {"final_norm_bias": (d_model,)} if norm["has_bias"] else {}
    transform = transform_attrs(model)
    if transform is not None:  # schema 2.3
        expected |= {"head_dense_weight": (d_model, d_model), "head_norm_weight": (d_model,)}
        expected |= {"head_dense_bias": (d_model,)} if transform["dense_has_bias"] else {}
        expected |= {"head_norm_bias": (d_model,)} if transform["norm_has_bias"] else {}
    return expected | ({"unembed_bias": (vocab,)} if has_unembed_bias else {})


def transform_attrs(model: zarr.Group) -> dict[str, Any] | None:
    """The model group's head transform description (schema 2.3; None where the unembedding reads the final norm's
    output), type-checked."""
    transform = model.attrs.get("head_transform")
    if transform is None:
        return None
    eps = transform.get("eps") if isinstance(transform, dict) else None
    if (not isinstance(transform, dict) or transform.get("activation") not in ACTIVATIONS
            or transform.get("norm_kind") not in ("rmsnorm", "layernorm")
            or not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0
            or not all(isinstance(transform.get(k), bool) for k in ("dense_has_bias", "norm_has_bias"))):
        raise DepthcacheError("the store's model/ attribute head_transform is malformed; re-extract the store")
    return transform


def every_chunk_written(attrs: dict[str, Any]) -> bool:
    """Schema >= 1.3: the model head is checksummed and every chunk is written (earlier writers skipped all-zero
    chunks of biases, which read back as zeros)."""
    return version_tuple(str(attrs["schema_version"])) >= CHECKSUMMED_HEAD


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


def chunking_problem(array: zarr.Array) -> str | None:
    """Why an array's declared chunking is not one a reader may follow (too many chunks, or chunks too large)."""
    chunk_bytes = math.prod(array.chunks) * array.dtype.itemsize
    if array.nchunks > MAX_CHUNKS:
        return f"is declared in {array.nchunks:,} chunks (limit {MAX_CHUNKS:,})"
    if chunk_bytes > MAX_CHUNK_BYTES:
        return f"is declared in chunks of {chunk_bytes:,} bytes (limit {MAX_CHUNK_BYTES:,})"
    return None


def physical_memory() -> int:
    """Bytes of RAM on this machine (a bound on what a store may make us allocate)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def checked_array(group: zarr.Group, name: str, shape: tuple[int, ...], every_chunk: bool = True) -> np.ndarray:
    """Read a float32 array of the model group after checking its shape, type and chunking (before allocating it);
    ``every_chunk``: refuse any missing chunk (schema >= 1.3), else only those of non-bias arrays."""
    if name not in group.array_keys():
        raise DepthcacheError(f"the store's model/ group lacks {name}; re-extract the store")
    array = group[name]
    if 4 * math.prod(shape) > physical_memory() // 2:
        raise DepthcacheError(f"the store's model/{name} of shape {shape} would take more than half of this "
                              "machine's memory")
    if tuple(array.shape) != shape or array.dtype != np.float32:
        raise DepthcacheError(f"the store's model/{name} is {array.dtype} {tuple(array.shape)}, expected float32 "
                              f"{shape} from the store's attributes")
    problem = chunking_problem(array)
    if problem:
        raise DepthcacheError(f"the store's model/{name} {problem}")
    if (every_chunk or not name.endswith("_bias")) and array.nchunks_initialized < array.nchunks:  # read as zeros
        raise DepthcacheError(f"the store's model/{name} has missing chunks; copy or re-extract the store")
    try:
        values = array[...]
    except Exception as exc:  # noqa: BLE001 - corrupt untrusted bytes may fail any codec in any way
        raise DepthcacheError(f"the store's model/{name} is corrupt ({type(exc).__name__}: {str(exc)[:200]}); copy "
                              "or re-extract the store") from exc
    if not np.isfinite(values).all():
        raise DepthcacheError(f"the store's model/{name} holds non-finite values")
    return values


def tokenizer_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """The stored tokenizer files' arrays by file name, names and shapes checked (nothing read yet) so no name can
    escape a folder and the files together take at most MAX_TOKENIZER_BYTES."""
    if TOKENIZER_GROUP not in group:
        raise DepthcacheError("the store has no model/tokenizer/ group; re-extract it")
    arrays = sorted(group[TOKENIZER_GROUP].arrays())
    if len(arrays) > MAX_TOKENIZER_FILES:
        raise DepthcacheError(f"the store's tokenizer has {len(arrays)} files, more than {MAX_TOKENIZER_FILES}")
    total = sum(math.prod(arr.shape) for _, arr in arrays)
    if total > MAX_TOKENIZER_BYTES:
        raise DepthcacheError(f"the store's tokenizer files take {total:,} bytes, more than {MAX_TOKENIZER_BYTES:,}")
    files: dict[str, zarr.Array] = {}
    for _, arr in arrays:
        name = arr.attrs.get("filename", "")
        if (not isinstance(name, str) or len(name) > MAX_FILENAME or PurePosixPath(name).name != name
                or "\\" in name or name.startswith(".") or not name.endswith(TOKENIZER_SUFFIXES) or name in files):
            raise DepthcacheError(f"store tokenizer file name {name[:MAX_FILENAME]!r} is not allowed")
        if arr.ndim != 1 or arr.dtype != np.uint8:
            raise DepthcacheError(f"store tokenizer file {name!r} is {arr.dtype} {arr.shape}, expected uint8 bytes")
        files[name] = arr
    return files


def tokenizer_files(group: zarr.Group, attrs: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The stored tokenizer files, names checked, and (given the store's attributes) their sha256 checked against
    the one recorded at extraction."""
    try:
        files = {name: arr[...].tobytes() for name, arr in tokenizer_arrays(group).items()}
    except DepthcacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt untrusted bytes may fail any codec in any way
        raise DepthcacheError(f"the store's tokenizer files are corrupt ({type(exc).__name__}: {str(exc)[:200]}); "
                              "copy or re-extract the store") from exc
    if attrs is not None and tokenizer_sha256(files) != attrs["model"]["tokenizer_sha256"]:
        raise DepthcacheError("the store's tokenizer files do not match the sha256 recorded at extraction; copy or "
                              "re-extract the store")
    return files


def head_problems(root: zarr.Group, attrs: dict[str, Any], chunks: Mapping[str, Mapping[tuple[int, ...], int]],
                  problems: Problems, read: bool) -> None:
    """Problems of the model head and tokenizer files: presence, shapes, chunking, crc32c codec and every chunk
    written (schema >= 1.3; older heads get a note); with ``read``, every chunk decoded and checksummed, values
    finite and the tokenizer's sha256 equal to the one recorded at extraction."""
    model = root.get(MODEL_GROUP)  # reads model/zarr.json only (group_keys would parse every member's)
    if not isinstance(model, zarr.Group):
        problems.add("the model/ group (final norm, unembedding, tokenizer) is missing")
        return
    current = every_chunk_written(attrs)
    if not current:
        problems.note(UNCHECKSUMMED_NOTE)
    try:
        shapes = head_shapes(model, attrs)
        arrays = {f"{MODEL_GROUP}/{name}": (array, shapes.get(name)) for name, array in model.arrays()
                  if name in shapes}
        arrays |= {f"{TOKENIZER_GROUP}/{array.basename}": (array, None)
                   for array in tokenizer_arrays(root).values()}
    except DepthcacheError as exc:
        problems.add(str(exc))
        return
    missing = sorted(f"{MODEL_GROUP}/{name}" for name in shapes if f"{MODEL_GROUP}/{name}" not in arrays)
    for path in missing:
        problems.add(f"array {path!r} is missing")
    before = problems.count
    for path, (array, shape) in arrays.items():
        head_array_problems(path, array, shape, current, chunks.get(path, {}), problems)
    if read and problems.count == before and not missing:
        read_head_arrays(model, root, attrs, shapes, arrays, problems)


def head_array_problems(path: str, array: zarr.Array, shape: tuple[int, ...] | None, current: bool,
                        present: Mapping[tuple[int, ...], int], problems: Problems) -> None:
    """One model/ array's declared shape, chunking and checksum codec, and its chunks' presence and sizes."""
    if shape is not None and (tuple(array.shape) != shape or array.dtype != np.float32):
        problems.add(f"array {path!r} is {array.dtype} {tuple(array.shape)}, expected float32 {shape} from the "
                     "store's attributes")
        return
    if array.nbytes > physical_memory() // 2:
        problems.add(f"array {path!r} of shape {tuple(array.shape)} would take more than half of this machine's "
                     "memory")
        return
    problem = chunking_problem(array)
    if problem:
        problems.add(f"array {path!r} {problem}")
        return
    if current and not is_checksummed(array.metadata.to_dict()["codecs"]):
        problems.add(f"array {path!r} has no crc32c checksum codec")
    if current or not path.endswith("_bias"):  # schema < 1.3 wrote no all-zero bias chunk
        chunk_bytes = math.prod(array.chunks) * array.dtype.itemsize
        grid_problems(path, tuple(array.cdata_shape), present, max_object_bytes(chunk_bytes), problems)


def read_head_arrays(model: zarr.Group, root: zarr.Group, attrs: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                     arrays: Mapping[str, tuple[zarr.Array, tuple[int, ...] | None]], problems: Problems) -> None:
    """Decode every model/ array (crc32c checked by the codec), check values and the tokenizer's sha256."""
    def fault_keys(tokenizer: bool, name: str = "") -> list[str]:
        """Every chunk of the tokenizer files, or of the head array ``name`` (fetched again by a repairing copy)."""
        return [chunk_key(path, c) for path, (a, _) in arrays.items()
                if (path.startswith(f"{TOKENIZER_GROUP}/") if tokenizer else path == f"{MODEL_GROUP}/{name}")
                for c in grid_coords(tuple(a.cdata_shape))]

    for name, shape in shapes.items():
        try:
            checked_array(model, name, shape, every_chunk_written(attrs))
            problems.count_read("model head arrays (crc32c)" if every_chunk_written(attrs)
                                else "model head arrays (no checksum)")
        except DepthcacheError as exc:
            for key in fault_keys(False, name):
                problems.keys.add(key)
            problems.add(str(exc))
    try:
        tokenizer_files(root, attrs)
        problems.count_read("tokenizer files (sha256)", len(tokenizer_arrays(root)))
    except DepthcacheError as exc:
        for key in fault_keys(True):
            problems.keys.add(key)
        problems.add(str(exc))


def load_tokenizer(location: str | Any) -> Any:
    """Rebuild the tokenizer from the store's JSON files, as data only: the fast tokenizer, never code or pickles."""
    from transformers import PreTrainedTokenizerFast

    from depthcache.store.io import open_group
    from depthcache.store.schema import check_store

    group = location if isinstance(location, zarr.Group) else open_group(str(location), "r")
    files = tokenizer_files(group, check_store(group))
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
    """What the unembedding reads, from float32 residuals (..., d_model): the model's final norm computed as HF does
    in float32 (the stored weight is the factor the norm multiplies by: Gemma's 1 + w is folded in), then a
    BERT-style head's transform where the store has one (schema 2.3)."""
    out = normalise(h.astype(np.float32, copy=False), head["norm_kind"], head["eps"], head["norm_weight"],
                    head["norm_bias"])
    return out if head.get("transform") is None else apply_head_transform(out, head["transform"])


def normalise(h: np.ndarray, kind: str, eps: float, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """RMSNorm or LayerNorm of float32 rows, times ``weight`` plus ``bias``."""
    if kind == "layernorm":
        h = h - h.mean(axis=-1, keepdims=True)
    out = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + np.float32(eps)) * weight
    return out + bias if bias is not None else out


def erf(x: np.ndarray) -> np.ndarray:
    """The error function in float32 (Abramowitz and Stegun 7.1.26: absolute error below 1.5e-7, plus rounding)."""
    t = 1.0 / (1.0 + np.float32(0.3275911) * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-x * x))).astype(np.float32)


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / np.float32(math.sqrt(2.0)))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def apply_head_transform(h: np.ndarray, transform: dict[str, Any]) -> np.ndarray:
    """A BERT-style head's transform of final-normed rows: norm(activation(h · dense_weightᵀ + dense_bias))."""
    x = h @ transform["dense_weight"].T
    if transform["dense_bias"] is not None:
        x = x + transform["dense_bias"]
    x = ACTIVATIONS[transform["activation"]](x).astype(np.float32, copy=False)
    return normalise(x, transform["norm_kind"], transform["eps"], transform["norm_weight"], transform["norm_bias"])


def logits_from_residual(h: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """Logit lens: the model's output transform of the unembedded, final-normed residual (float32): times the logit
    scale (Cohere, Granite), then soft-capped as cap·tanh(logits/cap) (Gemma 2)."""
    return output_transform(apply_final_norm(h, head) @ head["unembed"].T, head)


def output_transform(logits: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """The unembedding product made the model's logits, in place (float32): plus the bias, times the logit scale,
    then soft-capped as cap·tanh(logits/cap)."""
    if head["unembed_bias"] is not None:
        np.add(logits, head["unembed_bias"], out=logits)
    if head.get("logit_scale", 1.0) != 1.0:
        np.multiply(logits, np.float32(head["logit_scale"]), out=logits)
    if (cap := head.get("logit_softcap")) is not None:
        np.multiply(np.tanh(np.divide(logits, np.float32(cap), out=logits), out=logits), np.float32(cap), out=logits)
    return logits

