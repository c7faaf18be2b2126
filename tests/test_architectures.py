"""Discovered structure, the load check and coverage: tiny random models of many families, built offline."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from depthcache.coverage import CORPUS, cover, loaded_tiny, tiny_config, tiny_model, tiny_tokenizer
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.model import Capture, Skip, check_model, checked, discover, structure_of
from depthcache.model.structure import decoder_layers
from depthcache.store.head import logits_from_residual, read_head
from depthcache.store.io import read_attrs, write_attrs
from depthcache.store.layout import SCHEMA_VERSION
from depthcache.store.reader import open_dataset
from depthcache.store.schema import validate_store

# Facts about each family, known from its modeling code (not from discovery): what discovery must find.
EXPECTED: dict[str, dict] = {
    "llama": {"norm_kind": "rmsnorm", "parallel": False, "tied_embeddings": False},
    "mistral": {"sliding_window": 8, "layer_types": None},  # one window for every layer
    "qwen2": {"norm_kind": "rmsnorm", "sliding_window": None},  # layer_types: all full attention
    "gemma": {"norm_offset": 1.0, "embed_scale": 8.0, "tied_embeddings": True},
    "gemma2": {"norm_offset": 1.0, "embed_scale": 8.0, "attn_post_norm": True, "mlp_post_norm": True,
               "logit_softcap": 30.0, "sliding_window": 8},
    "gemma3_text": {"norm_offset": 1.0, "embed_scale": 8.0, "attn_post_norm": True, "mlp_post_norm": True},
    "olmo2": {"attn_post_norm": True, "mlp_post_norm": True, "parallel": False},
    "mixtral": {"moe_layers": (0, 1, 2, 3)},
    "qwen2_moe": {"moe_layers": (0, 1, 2, 3), "mlp": ("mlp",) * 4},  # the whole mixture, shared expert included
    "qwen3_moe": {"moe_layers": (0, 1, 2, 3), "mlp": ("mlp",) * 4},
    "olmoe": {"moe_layers": (0, 1, 2, 3)},
    "granitemoe": {"moe_layers": (0, 1, 2, 3), "branch_scale": 0.5, "logit_scale": 0.25, "embed_scale": 3.0},
    "gptj": {"parallel": True, "norm_kind": "layernorm"},
    "gpt_neox": {"parallel": True, "norm_kind": "layernorm"},
    "phi": {"parallel": True, "norm_kind": "layernorm"},
    "falcon": {"parallel": True},
    "cohere": {"parallel": True, "norm_kind": "layernorm", "logit_scale": 0.0625},
    "gpt2": {"parallel": False, "norm_kind": "layernorm", "embed_scale": None, "tied_embeddings": True},
    "opt": {"mlp": ("fc2",) * 4, "norm_kind": "layernorm"},
    "bloom": {"attn_adds_residual": True, "mlp_adds_residual": True, "embed_scale": None},
    "qwen3_next": {"attn_classes": ("Qwen3NextGatedDeltaNet",) * 3 + ("Qwen3NextAttention",),
                   "moe_layers": (0, 1, 2, 3)},
}
CI_FAMILIES = tuple(EXPECTED)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("model_type", CI_FAMILIES)
def test_family_passes_the_load_check_and_a_two_window_extraction(model_type: str, tokenizer) -> None:
    row = cover(model_type, tokenizer=tokenizer)
    assert row.supported, row.reason
    assert row.identity_error <= 1e-5 and row.logits_error <= 1e-4
    found = row.structure
    for key, value in EXPECTED[model_type].items():
        assert getattr(found, key) == value, (key, getattr(found, key))
    assert found.n_layers == 4


def test_at_least_fifteen_families_run_in_ci() -> None:
    assert len(CI_FAMILIES) >= 15


def test_gemma2_logit_lens_applies_the_soft_cap(tmp_path: Path, tokenizer) -> None:
    config = tiny_config("gemma2")
    config.final_logit_softcapping = 0.5  # far below the raw logits, so the cap changes them a lot
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    assert structure_of(model).logit_softcap == 0.5
    out = tmp_path / "g.zarr"
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "%s"}\n' % CORPUS)
    extract(ExtractOptions(out=str(out), model="tiny", data=str(data), dtype="float32", seq_len=16, max_tokens=32,
                           batch_size=2, chunk_tokens=16, progress=False, device="cpu"), loaded_tiny(model, tokenizer))
    ds = open_dataset(str(out)).load()
    head = read_head(str(out))
    with torch.no_grad():
        want = model(torch.tensor(ds.token_id.values[:16])[None]).logits[0].numpy()
    lens = logits_from_residual(ds.resid_final.values[:16], head)
    np.testing.assert_allclose(lens, want, rtol=1e-5, atol=1e-5)
    uncapped = logits_from_residual(ds.resid_final.values[:16], head | {"logit_softcap": None})
    assert np.abs(uncapped - want).max() > 1.0 and np.abs(want).max() <= 0.5  # without the cap the lens is wrong


def noisy_layer(model: torch.nn.Module, layer: int) -> None:
    """Make a layer add noise to its output: the residual identity breaks there and nowhere before."""
    def hook(module: torch.nn.Module, args: tuple, output):  # noqa: ANN001, ANN202
        hidden = output[0] if isinstance(output, tuple) else output
        noisy = hidden + 0.1 * hidden.abs().max()
        return (noisy, *output[1:]) if isinstance(output, tuple) else noisy
    decoder_layers(model)[layer].register_forward_hook(hook)


def test_a_broken_model_fails_the_check_in_one_line_and_nothing_is_written(tmp_path: Path, tokenizer) -> None:
    model = tiny_model("llama")
    structure_of(model)  # discovered on the intact model; the damage comes after
    noisy_layer(model, 2)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "%s"}\n' % CORPUS)
    opts = ExtractOptions(out=str(tmp_path / "s.zarr"), model="tiny", data=str(data), dtype="float32", seq_len=16,
                          max_tokens=32, batch_size=2, progress=False, device="cpu")
    with pytest.raises(DepthcacheError) as err:
        extract(opts, loaded_tiny(model, tokenizer))
    message = str(err.value)
    assert "\n" not in message and "LlamaForCausalLM (llama) fails the load check" in message
    assert "layer 2 outputs by" in message and "nothing was written" in message
    assert not (tmp_path / "s.zarr").exists()
    # --no-check is for users who know why: the store is written and records that no check ran
    extract(replace(opts, check=False), loaded_tiny(model, tokenizer))
    assert read_attrs(zarr.open_group(str(tmp_path / "s.zarr"), mode="r"))["model"]["load_check"] is None


def test_a_wrong_structure_fails_the_check_at_its_first_wrong_layer() -> None:
    model = tiny_model("llama")
    right = structure_of(model)
    wrong = replace(right, mlp=right.mlp[:1] + ("post_attention_layernorm",) * 3)  # the MLP's input norm
    assert check_model(model, right).identity_error <= 1e-5
    with pytest.raises(DepthcacheError, match=r"layer 1 outputs by [0-9.e-]+ \(relative; tolerance 1e-05\)"):
        check_model(model, wrong)


def test_a_wrong_logit_transform_fails_the_check() -> None:
    model = tiny_model("cohere")
    wrong = replace(structure_of(model), logit_scale=1.0)
    with pytest.raises(DepthcacheError, match="logit lens of resid_final differs from the model's logits"):
        check_model(model, wrong)


@pytest.mark.parametrize("model_type, why", [("deepseek_v4", "layer 0 keeps several residual streams"),
                                             ("zaya", "layer 0 rewrites the residual stream itself"),
                                             ("beam", "layer 0 multiplies the whole residual stream by 0.5774"),
                                             ("bart", "layer 0 normalises the residual stream itself (post-LN)"),
                                             ("t5", "it is an encoder-decoder")])
def test_non_decoders_are_refused_with_one_line(model_type: str, why: str) -> None:
    if model_type == "t5":  # not a causal LM at all: a seq2seq model handed to extraction
        from transformers import T5Config, T5ForConditionalGeneration

        model = T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                                    num_heads=4)).eval()
    else:
        model = tiny_model(model_type)
    with pytest.raises(DepthcacheError) as err:
        checked(model)
    assert f"is not a residual-stream decoder: {why}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("model_type", ["bloom", "opt", "falcon", "granitemoe", "gemma2"])
def test_a_skipped_layer_returns_its_input(model_type: str) -> None:
    model = tiny_model(model_type)
    structure = structure_of(model)
    ids = torch.arange(3, 15).view(1, -1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad(), Skip(model, structure, (1,), "layer", mask), \
            Capture(model, structure, range(4), ("resid", "attn", "mlp")) as cap:
        model(input_ids=ids, use_cache=False)
    h = cap.stacked("resid_pre")
    torch.testing.assert_close(h[2], h[1], rtol=0, atol=1e-6 * float(h[1].abs().max()))
    assert not cap.records["attn_out"][1].any() and not cap.records["mlp_out"][1].any()
    assert not torch.allclose(h[3], h[2])


def test_structure_is_recorded_and_schema_1_2_stores_still_open(tmp_path: Path, tokenizer) -> None:
    model = tiny_model("gemma2")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "%s"}\n' % CORPUS)
    out = tmp_path / "s.zarr"
    extract(ExtractOptions(out=str(out), model="tiny", data=str(data), dtype="float32", seq_len=16, max_tokens=32,
                           batch_size=2, chunk_tokens=16, progress=False, device="cpu"), loaded_tiny(model, tokenizer))
    attrs = read_attrs(zarr.open_group(str(out), mode="r"))
    assert attrs["schema_version"] == SCHEMA_VERSION and validate_store(str(out)) == []
    recorded = attrs["model"]["structure"]
    assert recorded["attn"] == ["post_attention_layernorm"] * 4 and recorded["logit_softcap"] == 30.0
    assert recorded["norm_offset"] == 1.0 and attrs["model"]["load_check"]["identity_error"] <= 1e-5
    stored = zarr.open_group(str(out), mode="r")["model/final_norm_weight"][...]
    np.testing.assert_array_equal(stored, (1.0 + model.model.norm.weight.detach()).numpy())  # 1 + w folded in
    # the same store as a 1.2 writer made it: no structure, no logit attributes
    group = zarr.open_group(str(out), mode="r+")
    old = {k: v for k, v in attrs.items()} | {"schema_version": "1.2"}
    old["model"] = {k: v for k, v in attrs["model"].items() if k not in ("structure", "load_check")}
    write_attrs(group, old)
    head = group["model"]
    del head.attrs["logit_scale"], head.attrs["logit_softcap"]
    assert validate_store(str(out)) == []
    read = read_head(str(out))
    assert read["logit_scale"] == 1.0 and read["logit_softcap"] is None
    assert open_dataset(str(out)).sizes["token"] == 32


def test_llama_structure_is_discovered() -> None:
    model = tiny_model("llama")
    found = discover(model)
    assert found.layers == "model.layers" and found.final_norm == "model.norm"
    assert found.attn == ("self_attn",) * 4 and found.mlp == ("mlp",) * 4
    assert found.norm_eps == model.config.rms_norm_eps and math.isclose(found.embed_scale, 1.0)


def test_logit_lens_analysis_applies_the_soft_cap_and_logit_scale(tmp_path: Path, tokenizer) -> None:
    """The logit-lens analysis forms its logits as the model does (Gemma-2's soft-cap, a logit scale): its
    per-layer KL equals a float64 computation from logits_from_residual, and differs from the uncapped one."""
    from depthcache.analyze import run
    from depthcache.analyze.logit_lens import lens_logits

    config = tiny_config("gemma2")
    config.final_logit_softcapping = 0.5
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    out, data = tmp_path / "g.zarr", tmp_path / "d.jsonl"
    data.write_text('{"text": "%s"}\n' % CORPUS)
    extract(ExtractOptions(out=str(out), model="tiny", data=str(data), dtype="float32", seq_len=16, max_tokens=32,
                           batch_size=2, chunk_tokens=16, progress=False, device="cpu"), loaded_tiny(model, tokenizer))
    ds, head = open_dataset(str(out)).load(), read_head(str(out))
    keep = ds.position.values >= 1

    def mean_kl(h: np.ndarray, final: np.ndarray, h_head: dict) -> float:
        z, zf = (logits_from_residual(x[keep], h_head).astype(np.float64) for x in (h, final))
        logp, logq = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (z, zf))
        return float((np.exp(logp) * (logp - logq)).sum(-1).mean())

    final = ds.resid_final.values
    want = [mean_kl(ds.resid_pre.values[layer], final, head) for layer in range(ds.sizes["layer"])]
    got = run("logit-lens", str(out)).kl_mean.values[:-1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    uncapped = [mean_kl(ds.resid_pre.values[layer], final, head | {"logit_softcap": None})
                for layer in range(ds.sizes["layer"])]
    assert np.abs(np.array(uncapped) - got).max() > 0.01  # ~1e-12 uncapped (one-hot) vs 0.01-0.04 capped
    scaled = head | {"logit_scale": 0.25}
    np.testing.assert_allclose(lens_logits(final[:4], scaled, "t"), logits_from_residual(final[:4], scaled),
                               rtol=1e-6, atol=1e-6)
