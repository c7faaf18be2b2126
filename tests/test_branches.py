"""Layers with any number of branches: state-space (Mamba), parallel hybrids (Falcon-H1), per-layer mixer kinds
(Nemotron-H) and RWKV, built tiny; what the store holds is checked against hooks of the test's own and the residual
identity in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from depthcache.analyze import run
from depthcache.coverage import CORPUS, tiny_config, tiny_tokenizer
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.skip_runs import SkipOptions, extract_skips
from depthcache.locate.run import check_site
from depthcache.model import load_model
from depthcache.model.structure import discover
from depthcache.store.io import read_attrs
from depthcache.store.reader import open_dataset
from depthcache.store.schema import validate_store
from depthcache.torch import ActivationDataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def build(model_type: str, **overrides: object) -> torch.nn.Module:
    """A tiny random model of the family (the coverage sweep's config) with config ``overrides``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def saved(model: torch.nn.Module, folder: Path) -> Path:
    """The model and the tiny tokenizer as a local checkpoint folder."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def extracted(folder: Path, out: Path, **options: object) -> Path:
    """A float32 store of 64 tokens of the corpus from the checkpoint at ``folder``."""
    data = out.parent / "d.jsonl"
    data.write_text('{"text": "%s"}\n' % CORPUS)
    extract(ExtractOptions(out=str(out), model=str(folder), data=str(data), dtype="float32", seq_len=16,
                           max_tokens=64, batch_size=2, chunk_tokens=16, progress=False, device="cpu", **options))
    return out


def own_outputs(model: torch.nn.Module, layers: torch.nn.ModuleList, names: tuple[str, ...], ids: torch.Tensor
                ) -> dict[str, list[torch.Tensor]]:
    """Each layer's child ``name`` output (first element), by plain forward hooks, and the logits."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [getattr(layer, n).register_forward_hook(
        lambda m, a, out, n=n: got[n].append((out[0] if isinstance(out, tuple) else out).detach().clone()))
        for layer in layers for n in names if hasattr(layer, n)]
    with torch.no_grad():
        got["logits"] = [model(input_ids=ids).logits]
    for h in handles:
        h.remove()
    return got


def identity_error(ds) -> float:  # noqa: ANN001 - an xarray Dataset
    """Largest |resid_pre[l] + Σ branches − resid_pre[l+1]| relative to the residual's largest value (float64)."""
    h = ds.resid_pre.values.astype(np.float64)
    nxt = np.concatenate([h[1:], ds.resid_final.values[None].astype(np.float64)])
    added = h + sum(ds[f"{role}_out"].values.astype(np.float64) for role in ("attn", "mlp") if f"{role}_out" in ds)
    return float(np.abs(added - nxt).max() / np.abs(nxt).max())


def test_a_mamba_store_has_no_mlp_site_and_every_analysis_runs(tmp_path: Path) -> None:
    model = build("mamba")
    structure = discover(model)
    assert structure.roles == ("attn",) and set(structure.mlp) == {""}
    assert structure.attn == ("mixer",) * structure.n_layers
    store = extracted(saved(model, tmp_path / "m"), tmp_path / "s.zarr")
    attrs = read_attrs(zarr.open_group(str(store), mode="r"))
    assert attrs["options"]["sites"] == ["resid", "attn"] and attrs["schema_version"] == "2.3"
    ds = open_dataset(str(store)).load()
    assert "mlp_out" not in ds and "attn_out" in ds  # no MLP site, not zeros
    assert identity_error(ds) <= 1e-5

    ids = torch.as_tensor(ds.token_id.values[:16]).view(1, -1)  # the first window, as the store has it
    got = own_outputs(model, model.backbone.layers, ("mixer",), ids)
    want = torch.stack(got["mixer"]).squeeze(1).numpy()  # (layer, token, d)
    np.testing.assert_allclose(ds.attn_out.values[:, :16], want, rtol=1e-5, atol=1e-6)

    result = run("contributions", str(store))
    assert (result.rel_mean.sel(sublayer="mlp") == 0).all()  # the MLP adds nothing: read from nowhere
    np.testing.assert_allclose(result.rel_mean.sel(sublayer="attn"), result.rel_mean.sel(sublayer="layer"))
    extract_skips(ExtractOptions(out=str(store), model=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"),
                                 dtype="float32", seq_len=16, max_tokens=64, batch_size=2, chunk_tokens=16,
                                 progress=False, device="cpu"), SkipOptions("1", tokens=32))
    assert "mlp_out" not in open_dataset(str(store), group="runs/skip_1")
    effects = run("skip-effects", str(store))
    assert np.isfinite(effects.max_effect.sel(skipped_layer=1).values[2:]).all()
    assert (effects.max_effect.sel(skipped_layer=1).values[2:] > 0).all()  # later layers change
    with pytest.raises(DepthcacheError, match="has no mlp branch"):
        extracted(tmp_path / "m", tmp_path / "mlp.zarr", sites=("mlp",))
    with pytest.raises(DepthcacheError, match=r"its model \(MambaForCausalLM\) has no mlp branch"):
        ActivationDataset(str(store), site="mlp_out")
    with pytest.raises(DepthcacheError, match="--site mlp: layer 0 of MambaForCausalLM has no mlp branch"):
        check_site(discover(model), "mlp", (0, 1))


def test_falcon_h1_adds_mamba_and_attention_in_parallel_each_with_its_multiplier(tmp_path: Path) -> None:
    model = build("falcon_h1", ssm_out_multiplier=0.5, attention_out_multiplier=0.25)
    structure = discover(model)
    assert structure.attn == ("mamba+self_attn",) * structure.n_layers
    assert structure.mlp == ("feed_forward",) * structure.n_layers
    assert dict(structure.part_scales) == {"mamba": 0.5, "self_attn": 0.25} and structure.branch_scale == 1.0
    store = extracted(saved(model, tmp_path / "m"), tmp_path / "s.zarr")
    ds = open_dataset(str(store)).load()
    assert identity_error(ds) <= 1e-5
    ids = torch.as_tensor(ds.token_id.values[:16]).view(1, -1)
    got = own_outputs(model, model.model.layers, ("mamba", "self_attn", "feed_forward"), ids)
    mixers = 0.5 * torch.stack(got["mamba"]) + 0.25 * torch.stack(got["self_attn"])
    np.testing.assert_allclose(ds.attn_out.values[:, :16], mixers.squeeze(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.mlp_out.values[:, :16], torch.stack(got["feed_forward"]).squeeze(1).numpy(),
                               rtol=1e-5, atol=1e-6)

    # --sites parts: each token mixer apart, summing to attn_out; the store validates
    parts = extracted(tmp_path / "m", tmp_path / "parts.zarr", sites=("resid", "attn", "mlp", "parts"))
    pds = open_dataset(str(parts)).load()
    assert {n for n in pds.data_vars if n.startswith("part_")} == {"part_mamba", "part_self_attn"}
    np.testing.assert_allclose(pds.part_mamba.values[:, :16], 0.5 * torch.stack(got["mamba"]).squeeze(1).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pds.part_mamba.values + pds.part_self_attn.values, pds.attn_out.values, rtol=1e-5,
                               atol=1e-6)
    assert validate_store(str(parts)) == []
    rows = next(iter(ActivationDataset(str(parts), site="part_mamba", layers=2, batch_size=64)))
    np.testing.assert_array_equal(rows["activations"].numpy(), pds.part_mamba.values[2, :64])
    result = run("contributions", str(parts))  # each module is a sublayer too, against the layer input h
    keep = pds.position.values > 0
    h = pds.resid_pre.values[:, keep].astype(np.float64)
    for name in ("part_mamba", "part_self_attn"):
        p = pds[name].values[:, keep].astype(np.float64)
        want = (np.linalg.norm(p, axis=-1) / np.linalg.norm(h, axis=-1)).mean(axis=1)
        np.testing.assert_allclose(result.rel_mean.sel(sublayer=name).values, want, rtol=1e-6)

    # skipping the token mixers of layer 1 zeroes both of them: the same as the test's own hooks doing it
    loaded = load_model(str(tmp_path / "m"))
    from depthcache.model.skips import Skip

    mask = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad(), Skip(loaded.model, structure, (1,), "attn", mask):
        skipped = loaded.model(input_ids=ids).logits
    layer = loaded.model.model.layers[1]
    zero = [getattr(layer, n).register_forward_hook(
        lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out))
        for n in ("mamba", "self_attn")]
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits
    for h in zero:
        h.remove()
    torch.testing.assert_close(skipped, want)

    # one branch module alone: Mamba of layer 1, attention left running (a skip run per branch)
    with torch.no_grad(), Skip(loaded.model, structure, (1,), "mamba", mask):
        skipped = loaded.model(input_ids=ids).logits
    zero = layer.mamba.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits
    zero.remove()
    torch.testing.assert_close(skipped, want)
    opts = ExtractOptions(out=str(store), model=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"), dtype="float32",
                          seq_len=16, max_tokens=64, batch_size=2, chunk_tokens=16, progress=False, device="cpu")
    extract_skips(opts, SkipOptions("1,2", "mamba", 32), loaded)
    effects = run("skip-effects", str(store), sublayer="mamba")
    assert list(effects.skipped_layer.values) == [1, 2] and (effects.max_effect.values[:, 3] > 0).all()
    with pytest.raises(DepthcacheError, match="layer 1 of FalconH1ForCausalLM has no branch 'conv'"):
        extract_skips(opts, SkipOptions("1", "conv", 32), loaded)


def test_nemotron_h_layers_add_one_mixer_of_their_own_kind(tmp_path: Path) -> None:
    model = build("nemotron_h")
    structure = discover(model)
    kinds = [type(block.mixer).__name__ for block in model.model.layers]
    for layer, kind in enumerate(kinds):  # Mamba and attention are token mixers, the MLP and MoE channel mixers
        token_mixer = "Mamba" in kind or "Attention" in kind
        assert (structure.attn[layer], structure.mlp[layer]) == (("mixer", "") if token_mixer else ("", "mixer"))
    store = extracted(saved(model, tmp_path / "m"), tmp_path / "s.zarr")
    ds = open_dataset(str(store)).load()
    assert identity_error(ds) <= 1e-5
    for layer in range(structure.n_layers):  # a layer without a branch of a role adds exactly zero through it
        absent = "mlp_out" if structure.attn[layer] else "attn_out"
        assert not ds[absent].values[layer].any()


def test_rwkv_stream_starts_after_pre_ln_and_its_halving_is_turned_off(tmp_path: Path) -> None:
    reference = build("rwkv", rescale_every=2)  # halves the stream after layers 2 (and rescales weights) in eval
    ids = torch.arange(3, 19).view(1, -1)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
    model = build("rwkv", rescale_every=2)
    structure = discover(model)
    assert structure.input_norm == "pre_ln" and model.config.rescale_every == 0
    with torch.no_grad():  # the same logits but for the layer norms' epsilon, which sees the halved stream
        assert float((model(input_ids=ids).logits - want).abs().max()) <= 1e-3 * float(want.abs().max())
    with pytest.raises(DepthcacheError, match="halves the residual stream every 2 layers"):
        discover(reference)  # already rescaled by a forward in eval mode
    store = extracted(saved(model, tmp_path / "m"), tmp_path / "s.zarr")
    ds = open_dataset(str(store)).load()
    assert identity_error(ds) <= 1e-5
    got = own_outputs(model, model.rwkv.blocks, ("pre_ln",), ids)
    assert len(got["pre_ln"]) == 1  # layer 0 only
