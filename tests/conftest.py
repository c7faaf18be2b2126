"""Shared fixtures: tiny random-weight models of every supported architecture, saved as local HF folders."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch loads: no spinning on shared cores

import json  # noqa: E402
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import depthcache  # noqa: F401 - registers the bfloat16 zarr data type

VOCAB = 384
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Residual streams carry information from layer to layer.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 + - = ( ) and some punctuation, too!",
    "Language models use their depth in interesting ways; some layers matter more.",
]
ARCHS = ("llama", "qwen2", "qwen3", "olmo2", "gpt2", "gpt_neox")


def write_documents(path: Path, lengths: list[int]) -> Path:
    """A JSONL file of documents: document i joins ``lengths[i]`` CORPUS sentences, starting at sentence i mod 4."""
    path.write_text("\n".join(json.dumps({"text": " ".join(CORPUS[(i + j) % 4] for j in range(n))})
                              for i, n in enumerate(lengths)))
    return path


def tiny_tokenizer(with_bos: bool) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences; optionally prepends BOS like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def tiny_config(arch: str, n_layers: int = 4) -> transformers.PretrainedConfig:
    """An ``n_layers``-layer, d_model 64 config of one architecture family, ids inside the tiny vocabulary."""
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
                   max_position_embeddings=256, **common)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **decoder)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **decoder)
    if arch == "qwen3":
        return transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **decoder)
    if arch == "olmo2":
        return transformers.Olmo2Config(num_key_value_heads=2, **decoder)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**decoder)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path, seed: int = 0, n_layers: int = 4) -> Path:
    """Build a random tiny model of ``arch`` and save it with its tokenizer as a local HF folder."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, n_layers))
    # Random init leaves sublayer outputs tiny next to embeddings; scale up so every branch matters in tests.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                param.mul_(4.0)
    model.save_pretrained(folder)
    tiny_tokenizer(with_bos=arch in ("llama", "qwen3", "olmo2")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random models, one per supported architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small multi-document JSONL dataset with documents of different lengths."""
    import json

    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [" ".join(CORPUS[i % len(CORPUS)] for i in range(n)) for n in (1, 7, 3, 12, 2)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return path
