"""Branches discovery finds below a layer's direct children, and heads that transform before the unembedding: a
residual block nested in the layer (DBRX's NormAttentionNorm, Zamba's Mamba decoder layer), a branch that only feeds
another (Zamba's shared transformer), branches kept in a child list (LongCat-Flash), a side branch completing the
layer (Gemma 4's per-layer input), projections adding ``input_tensor`` (BERT-style pre-LN layers) and a BERT-style
head (schema 2.3). Built tiny; stores are checked against the test's own hooks and numpy."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from depthcache.coverage import (
    loaded_tiny,
    text_model_refusal,
    tiny_model,
    tiny_tokenizer,
    two_window_extraction,
)
from depthcache.errors import DepthcacheError
from depthcache.model.pruned import prune_model
from depthcache.model.skips import Skip, only_layers
from depthcache.model.structure import discover, submodule
from depthcache.store.head import erf, logits_from_residual, read_head
from depthcache.store.io import read_attrs
from depthcache.store.reader import open_dataset
from depthcache.store.schema import validate_store
from tests.test_branches import build, extracted, identity_error, saved

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
IDS = torch.arange(5, 21).view(1, -1)


def module_outputs(model: torch.nn.Module, layers: torch.nn.ModuleList, path: str, ids: torch.Tensor
                   ) -> torch.Tensor:
    """Each layer's module ``path`` output (first element) on ``ids`` by plain forward hooks, zeros where a layer
    lacks it: (layers, tokens, d_model)."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        try:
            module = submodule(layer, path)
        except AttributeError:
            continue
        handles.append(module.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach().clone())))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    d = model.config.get_text_config().hidden_size
    return torch.stack([got.get(i, torch.zeros(1, ids.shape[1], d)).reshape(ids.shape[1], d)
                        for i in range(len(layers))])


def stored(model: torch.nn.Module, tmp_path: Path):  # noqa: ANN201 - an xarray Dataset
    """The model's store (64 tokens, float32), loaded; its first window 16 tokens."""
    return open_dataset(str(extracted(saved(model, tmp_path / "m"), tmp_path / "s.zarr"))).load()


def first_window(ds) -> torch.Tensor:  # noqa: ANN001 - an xarray Dataset
    """The token ids of the store's first 16-token window."""
    return torch.as_tensor(ds.token_id.values[:16]).view(1, -1)


def test_dbrx_attention_inside_a_norm_container_is_the_token_mixer(tmp_path: Path) -> None:
    model = tiny_model("dbrx").eval()
    structure = discover(model)
    assert structure.attn == ("norm_attn_norm.attn",) * structure.n_layers and structure.mlp[0] == "ffn"
    ds = stored(model, tmp_path)
    assert identity_error(ds) <= 1e-5
    ids = first_window(ds)
    want = module_outputs(model, model.transformer.blocks, "norm_attn_norm.attn", ids)
    np.testing.assert_allclose(ds.attn_out.values[:, :16], want.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad(), Skip(model, structure, (1,), "attn", torch.ones(1, 16, dtype=torch.bool)):
        skipped = model(input_ids=ids).logits  # the container then adds nothing and normalises its input
    zero = model.transformer.blocks[1].norm_attn_norm.attn.register_forward_hook(
        lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
    zero.remove()
    torch.testing.assert_close(skipped, want_logits)


def test_zamba_shared_transformer_only_feeds_the_mamba_it_runs_beside(tmp_path: Path) -> None:
    model = tiny_model("zamba").eval()
    structure = discover(model)
    kinds = [type(layer).__name__ for layer in model.model.layers]
    assert "ZambaHybridLayer" in kinds
    for layer, kind in enumerate(kinds):  # the hybrid's attention output reaches the stream only through Mamba
        assert structure.attn[layer] == ("mamba_decoder.mamba" if kind == "ZambaHybridLayer" else "mamba")
    assert structure.roles == ("attn",)
    ds = stored(model, tmp_path)
    assert identity_error(ds) <= 1e-5


def test_longcat_flash_two_attentions_in_a_list_and_layers_counted_once() -> None:
    model = tiny_model("longcat_flash").eval()
    structure = discover(model)
    config = model.config
    assert structure.n_layers == config.num_layers == config.num_hidden_layers // 2
    assert structure.attn == ("self_attn.0+self_attn.1",) * structure.n_layers
    assert structure.mlp == ("mlp+mlps.0+mlps.1",) * structure.n_layers  # the shortcut MoE and the two MLPs


@pytest.mark.parametrize("moe", [False, True])
def test_gemma4_adds_its_mlp_block_and_its_per_layer_input_gate_as_channel_mixers(moe: bool, tmp_path: Path) -> None:
    """The per-layer-input gate is a side branch; with the MoE block, the norm of the dense MLP's and the experts'
    summed outputs is what the MLP block adds."""
    model = build("gemma4_text", enable_moe_block=moe, top_k_experts=2)
    structure = discover(model)
    assert structure.mlp == ("post_feedforward_layernorm+post_per_layer_input_norm",) * structure.n_layers
    assert structure.moe_layers == (tuple(range(structure.n_layers)) if moe else ())
    ds = stored(model, tmp_path)
    assert identity_error(ds) <= 1e-5
    ids = first_window(ds)
    layers = model.model.layers
    want = (module_outputs(model, layers, "post_feedforward_layernorm", ids)
            + module_outputs(model, layers, "post_per_layer_input_norm", ids))
    # with experts, the store's batch of two windows routes and sums them in another order: float32 rounding
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if moe else {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(ds.mlp_out.values[:, :16], want.numpy(), **tolerance)


def test_gemma4_layer_scalar_other_than_one_is_refused_as_a_rescaled_stream() -> None:
    model = tiny_model("gemma4_text").eval()
    for layer in model.model.layers:  # checkpoints load it; a tiny random model has ones
        layer.layer_scalar.fill_(0.5)
    with pytest.raises(DepthcacheError, match="multiplies the whole residual stream by 0.5"):
        discover(model)


def test_a_bert_style_head_transform_is_stored_and_the_lens_reproduces_the_logits(tmp_path: Path) -> None:
    model = tiny_model("modernbert-decoder").eval()
    structure = discover(model)
    assert (structure.head_dense, structure.head_activation, structure.head_norm) == \
        ("lm_head.dense", "gelu", "lm_head.norm")
    store = extracted(saved(model, tmp_path / "m"), tmp_path / "s.zarr")
    assert read_attrs(zarr.open_group(str(store), mode="r"))["schema_version"] == "2.3" and validate_store(str(store)) == []
    ds = open_dataset(str(store)).load()
    head = read_head(str(store))
    np.testing.assert_array_equal(head["transform"]["dense_weight"], model.lm_head.dense.weight.detach().numpy())
    with torch.no_grad():
        want = model(input_ids=first_window(ds)).logits[0].double().numpy()
    got = logits_from_residual(ds.resid_final.values[:16], head).astype(np.float64)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    model_head = read_head(str(store))
    model_head["transform"] = None  # without the transform the lens is another function: the check can fail
    assert np.abs(logits_from_residual(ds.resid_final.values[:16], model_head) - want).max() > 1e-2

    group = zarr.open_group(str(store / "model"), mode="r+")
    group.attrs["head_transform"] = {**group.attrs["head_transform"], "activation": "exp"}
    with pytest.raises(DepthcacheError, match="head_transform is malformed"):
        read_head(str(store))


def test_numpy_erf_matches_the_math_library() -> None:
    x = np.linspace(-6, 6, 20001, dtype=np.float32)
    want = np.array([math.erf(float(v)) for v in x])
    assert np.abs(erf(x) - want).max() <= 6e-7  # the approximation's 1.5e-7 plus float32 rounding (4 ulps of 1)


@pytest.mark.parametrize(("model_type", "reason"), [
    ("bert", "layer 0 normalises the residual stream itself (post-LN)"),  # the norm inside BertOutput
    ("xlm", "the stream entering layer 1 is a norm's output"),  # attentions, norms and FFNs in separate lists
    ("hrm_text", "run several times per forward"),
    ("gemma3n_text", "keeps several residual streams (altup: Gemma3nTextAltUp)"),
    ("reformer", "take and return two residual streams (a reversible residual)"),
    ("cpmant", "its layers run on 48 positions for 16 positions of logits"),
    ("minimax", "not its input plus its branches' outputs with any factors"),
    ("blt", "split over several stacks"),
])
def test_refusals_name_the_structure(model_type: str, reason: str) -> None:
    with pytest.raises(DepthcacheError, match=re.escape(reason)):
        discover(tiny_model(model_type).eval())


def test_mllama_cross_attention_layers_idle_on_text_are_removed_and_change_nothing(tmp_path: Path) -> None:
    untouched, model = tiny_model("mllama").eval(), tiny_model("mllama").eval()
    total = model.config.get_text_config().num_hidden_layers
    idle = tuple(i for i in model.config.get_text_config().cross_attention_layers if i < total)
    structure = discover(model)
    assert idle and structure.idle_layers == idle and structure.n_layers == total - len(idle)
    assert model.config.get_text_config().cross_attention_layers == []  # no kept layer is skipped
    assert all(type(layer).__name__ == "MllamaSelfAttentionDecoderLayer" for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, untouched(input_ids=IDS).logits, rtol=0, atol=0)
    identity, _ = two_window_extraction(loaded_tiny(model, tiny_tokenizer()), tmp_path)  # in memory: the text
    assert identity <= 1e-5  # config alone is no AutoModelForCausalLM checkpoint
    assert open_dataset(str(tmp_path / "store.zarr")).sizes["layer"] == total - len(idle)
    attrs = read_attrs(zarr.open_group(str(tmp_path / "store.zarr"), mode="r"))
    assert attrs["model"]["structure"]["idle_layers"] == list(idle)


def test_a_wrapper_that_hides_its_language_models_head_exposes_it() -> None:
    model = tiny_model("nemotron_h_omni", image_text=True).eval()  # towers released as loading does
    assert model.get_output_embeddings() is model.language_model.lm_head
    assert discover(model).language_model == "NemotronHModel"


def test_a_tower_needing_timm_does_not_hide_the_language_models_own_reason() -> None:
    assert "keeps several residual streams (altup" in text_model_refusal("gemma3n")


def test_layers_reusing_earlier_keys_and_values_refuse_runs_that_drop_their_source() -> None:
    model = build("gemma4_text", num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2)
    structure = discover(model)
    ids = torch.arange(5, 21).view(1, -1)
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
        with only_layers(model, structure, [0, 1, 2, 3], full.hidden_states[0]):  # every layer: allowed, the same
            torch.testing.assert_close(model(input_ids=ids).logits, full.logits)
    with pytest.raises(DepthcacheError, match=r"shares keys and values across layers \(layers 2, 3 reuse"):
        with only_layers(model, structure, [2, 3], full.hidden_states[2]):  # transformers would raise a KeyError
            pass
    with pytest.raises(DepthcacheError, match="pruned copies are not supported"):
        prune_model(model, (0, 2, 3))
    assert len(model.model.layers) == 4  # refused before anything changed
