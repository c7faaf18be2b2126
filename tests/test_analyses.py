"""contributions, logit-lens and effective-depth against direct float64 numpy computations; caching, CLI, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from conftest import write_documents

from depthcache.analyze import run
from depthcache.analyze.effective_depth import cutoff_indices
from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.store import results
from depthcache.store.head import read_head
from depthcache.store.reader import Store, open_dataset

F32_TOL = 1e-5  # float32 store: per-token values from float32 dot products vs float64 reference
BF16_TOL = 1e-4  # bf16 store: both sides read the same bf16 values; only float32 arithmetic differs


def make_store(root: Path, model: Path, dtype: str, sites: tuple[str, ...] = ("resid", "attn", "mlp"),
               name: str | None = None) -> Path:
    """A store of 8 documents of different lengths (windows of ≤ 40 tokens, chunks of 32 tokens)."""
    data = root / "docs.jsonl"
    write_documents(data, [1 + 2 * (i % 4) for i in range(8)])
    out = root / (name or f"{dtype}.zarr")
    extract(ExtractOptions(out=str(out), model=str(model), data=str(data), dtype=dtype, sites=sites, seq_len=40,
                           batch_size=4, chunk_tokens=32, progress=False, device="cpu"))
    return out


@pytest.fixture(scope="module")
def stores(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 and bf16 stores of the tiny Llama, a float32 store of the parallel-residual GPT-NeoX."""
    root = tmp_path_factory.mktemp("analyses")
    return {"float32": make_store(root, tiny_models["llama"], "float32"),
            "bfloat16": make_store(root, tiny_models["llama"], "bfloat16"),
            "neox": make_store(root, tiny_models["gpt_neox"], "float32", name="neox.zarr")}


def cached(store: Path, name: str) -> xr.Dataset:
    """The one cached result of ``name`` (default parameters) in a store."""
    (entry,) = results.entries(results.places(Store(str(store)))[0], name)
    return results.load(entry)


def fresh(store: Path, tmp_path: Path) -> Path:
    """A copy of ``store`` without cached results."""
    copy = tmp_path / store.name
    shutil.copytree(store, copy)
    shutil.rmtree(copy / "analyses", ignore_errors=True)
    return copy


def cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine over the last axis, float64."""
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


def reference_contributions(store: Path, include_first: bool, parallel: bool) -> dict[str, np.ndarray]:
    """Every per-token quantity in float64 from whole arrays, reduced over the kept tokens."""
    ds = open_dataset(store).load()
    h, a, m = (ds[k].values.astype(np.float64) for k in ("resid_pre", "attn_out", "mlp_out"))
    keep = ds.position.values >= (0 if include_first else 1)
    d = a + m
    into = h if parallel else h + a
    rel = np.stack([np.linalg.norm(a, axis=-1) / np.linalg.norm(h, axis=-1),
                    np.linalg.norm(m, axis=-1) / np.linalg.norm(into, axis=-1),
                    np.linalg.norm(d, axis=-1) / np.linalg.norm(h, axis=-1)])[..., keep]
    cosine = np.stack([cos(a, h), cos(m, into), cos(d, h)])[..., keep]
    norms = np.stack([np.linalg.norm(x, axis=-1) for x in (a, m, d)])[..., keep]
    return {"rel_mean": rel.mean(-1), "rel_std": rel.std(-1), "rel_max": rel.max(-1), "cos_mean": cosine.mean(-1),
            "cos_std": cosine.std(-1), "norm_mean": norms.mean(-1), "norm_max": norms.max(-1),
            "resid_norm_mean": np.linalg.norm(h, axis=-1)[:, keep].mean(-1),
            "resid_norm_max": np.linalg.norm(h, axis=-1)[:, keep].max(-1),
            "turn_cos_mean": cos(h + d, h)[:, keep].mean(-1), "turn_cos_std": cos(h + d, h)[:, keep].std(-1),
            "positions": ds.position.values[keep], "rel_tokens": rel}


@pytest.mark.parametrize("dtype,include_first", [("float32", False), ("float32", True), ("bfloat16", False)])
def test_contributions_match_numpy(stores, tmp_path, dtype, include_first):
    store = fresh(stores[dtype], tmp_path)
    result = run("contributions", str(store), include_first=include_first)
    ref = reference_contributions(store, include_first, parallel=False)
    tol = F32_TOL if dtype == "float32" else BF16_TOL
    for name in ("rel_mean", "rel_std", "rel_max", "cos_mean", "cos_std", "norm_mean", "norm_max", "resid_norm_mean",
                 "resid_norm_max", "turn_cos_mean", "turn_cos_std"):
        np.testing.assert_allclose(result[name].values, ref[name], rtol=tol, atol=tol, err_msg=name)
    assert int(result.tokens_used) == len(ref["positions"])
    assert result.attrs["include_first"] == int(include_first)
    # position buckets: the mean over the tokens of each bucket
    for b, (lo, hi) in enumerate(zip(result.bucket_start.values, result.bucket_end.values)):
        in_bucket = (ref["positions"] >= lo) & (ref["positions"] <= hi)
        assert result.tokens_by_position.values[b] == in_bucket.sum()
        if in_bucket.any():
            np.testing.assert_allclose(result.rel_mean_by_position.values[..., b],
                                       ref["rel_tokens"][..., in_bucket].mean(-1), rtol=tol)
        else:
            assert np.isnan(result.rel_mean_by_position.values[..., b]).all()
    assert result.relative_depth.values.tolist() == [0, 0.25, 0.5, 0.75]


def test_contributions_parallel_residual(stores, tmp_path):
    """GPT-NeoX: the MLP reads h, not h + a (the sequential formula gives different numbers on this store)."""
    store = fresh(stores["neox"], tmp_path)
    result = run("contributions", str(store))
    assert result.attrs["parallel_residual"] == 1
    parallel = reference_contributions(store, False, parallel=True)
    np.testing.assert_allclose(result.rel_mean.values, parallel["rel_mean"], rtol=F32_TOL)
    np.testing.assert_allclose(result.cos_mean.values, parallel["cos_mean"], rtol=F32_TOL, atol=F32_TOL)
    sequential = reference_contributions(store, False, parallel=False)
    assert not np.allclose(result.rel_mean.sel(sublayer="mlp").values, sequential["rel_mean"][1], rtol=1e-3)


def softmax64(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64."""
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def reference_lens(store: Path, include_first: bool) -> dict[str, np.ndarray]:
    """Logit lens per layer in float64 from whole arrays, top-5 sets by full sort."""
    ds = open_dataset(store).load()
    head = read_head(str(store))
    w, e = head["norm_weight"].astype(np.float64), head["eps"]
    keep = ds.position.values >= (0 if include_first else 1)
    hs = np.concatenate([ds.resid_pre.values, ds.resid_final.values[None]]).astype(np.float64)[:, keep]

    def logits(h: np.ndarray) -> np.ndarray:
        normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + e) * w
        return normed @ head["unembed"].astype(np.float64).T

    final = logits(hs[-1])
    p_final, top5_final = softmax64(final), np.argsort(-final, -1)[:, :5]
    out = {"kl": [], "top1": [], "top5": []}
    for h in hs:
        z = logits(h)
        p = softmax64(z)
        out["kl"].append((p * (np.log(p) - np.log(p_final))).sum(-1).mean())
        out["top1"].append((z.argmax(-1) == final.argmax(-1)).mean())
        top5 = np.argsort(-z, -1)[:, :5]
        out["top5"].append(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5, top5_final)]))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("dtype,include_first", [("float32", False), ("float32", True), ("bfloat16", False)])
def test_logit_lens_matches_numpy(stores, tmp_path, dtype, include_first):
    store = fresh(stores[dtype], tmp_path)
    result = run("logit-lens", str(store), include_first=include_first)
    ref = reference_lens(store, include_first)
    np.testing.assert_allclose(result.kl_mean.values, ref["kl"], rtol=1e-4, atol=1e-6)  # float32 logits vs float64
    np.testing.assert_allclose(result.top1_agreement.values, ref["top1"], atol=1e-12)
    np.testing.assert_allclose(result.top5_overlap.values, ref["top5"], atol=1e-12)
    assert result.layer.values.tolist() == [0, 1, 2, 3, 4]
    assert result.kl_mean.values[-1] == pytest.approx(0, abs=1e-6) and result.top1_agreement.values[-1] == 1


def test_logit_lens_max_tokens(stores, tmp_path):
    store = fresh(stores["float32"], tmp_path)
    result = run("logit-lens", str(store), max_tokens=40)
    positions = open_dataset(store).position.values[:40]
    assert int(result.tokens_used) == (positions >= 1).sum() < 40


def test_effective_depth_cutoffs_and_info(stores, tmp_path):
    store = fresh(stores["float32"], tmp_path)
    assert "depth use" not in CliRunner().invoke(main, ["info", str(store)]).output
    contrib, lens = run("contributions", str(store)), run("logit-lens", str(store))
    assert "depth use" in CliRunner().invoke(main, ["info", str(store)]).output  # from the two inputs
    result = run("effective-depth", str(store))
    cos_layer = contrib.cos_mean.sel(sublayer="layer").values
    kl, top5 = lens.kl_mean.values, lens.top5_overlap.values  # boundaries 0..4, 4 = the output
    negative = cos_layer < 0
    expected = {"cos_zero": next((i for i in range(2, 4) if all(negative[i:] != negative[1])), -1),
                "kl_drop": next(i for i in range(5) if kl[i] <= 0.1 * kl.max()),
                "top5_rise": next(i for i in range(5) if top5[i] > 0.2)}
    for key, layer in expected.items():
        assert int(result[f"{key}_layer"]) == layer
        depth = float(result[f"{key}_depth"])
        assert depth == layer / 4 if layer >= 0 else np.isnan(depth)
    np.testing.assert_array_equal(result.kl_mean.values, lens.kl_mean.values)
    assert result.cos_mean.dims == ("sublayer", "layer")
    info = CliRunner().invoke(main, ["info", str(store)]).output
    assert "depth use" in info and "top-5 overlap > 0.2" in info


LAYERS = np.arange(6)


def test_cos_cutoff_ignores_the_embedding_layer():
    # layer 0 (reading the embedding) is slightly negative; the layers after it turn negative only at layer 4
    cos = np.array([-0.06, 0.3, 0.2, 0.1, -0.1, -0.2])
    assert cutoff_indices(cos, LAYERS, np.zeros(7), np.ones(7))["cos_zero"] == 4


def test_cos_cutoff_needs_a_lasting_sign_change():
    # a one-layer dip below zero at layer 2 is not the change; the lasting one at layer 4 is
    assert cutoff_indices(np.array([0.1, 0.3, -0.01, 0.2, -0.2, -0.3]), LAYERS, np.zeros(7), np.ones(7))[
        "cos_zero"] == 4
    # two negative layers that turn positive again are not a change either
    assert cutoff_indices(np.array([0.1, 0.3, -0.1, -0.2, 0.2, 0.1]), LAYERS, np.zeros(7), np.ones(7))[
        "cos_zero"] == -1
    # a change at the last stored layer counts (nothing after it can undo it); no change at all: never
    assert cutoff_indices(np.array([0.1, 0.3, 0.2, 0.2, 0.1, -0.3]), LAYERS, np.zeros(7), np.ones(7))[
        "cos_zero"] == 5
    assert cutoff_indices(np.array([-0.5, 0.3, 0.2, 0.2, 0.1, 0.1]), LAYERS, np.zeros(7), np.ones(7))[
        "cos_zero"] == -1
    # stored layers 3..5 only: layer 3 is the reference
    assert cutoff_indices(np.array([0.2, -0.1, -0.1]), np.array([3, 4, 5]), np.zeros(4), np.ones(4))[
        "cos_zero"] == 1


def test_kl_cutoff_counts_the_output_in_its_scale_and_as_a_candidate():
    # the inputs never fall below 0.1 × 5.0, but the output (KL 0) does: the cutoff is the output, not "never"
    kl = np.array([5.0, 4.0, 3.0, 1.0, 0.8, 0.6, 0.0])
    assert cutoff_indices(np.ones(6), LAYERS, kl, np.ones(7))["kl_drop"] == 6
    # the output's KL is part of the scale: a drop to 0.1 × max among the inputs is found there
    kl = np.array([5.0, 4.0, 0.5, 0.3, 0.2, 0.1, 0.0])
    assert cutoff_indices(np.ones(6), LAYERS, kl, np.ones(7))["kl_drop"] == 2
    # a lens that agrees with the output everywhere: the first boundary
    assert cutoff_indices(np.ones(6), LAYERS, np.zeros(7), np.ones(7))["kl_drop"] == 0


def test_top5_cutoff_and_the_summary_in_layers():
    top5 = np.array([0.0, 0.1, 0.2, 0.21, 0.6, 0.9, 1.0])
    assert cutoff_indices(np.ones(6), LAYERS, np.zeros(7), top5)["top5_rise"] == 3
    assert cutoff_indices(np.ones(6), LAYERS, np.zeros(7), np.zeros(7))["top5_rise"] == -1


def test_cache_force_cli_and_plots(stores, tmp_path):
    store = fresh(stores["float32"], tmp_path)
    cli = CliRunner()
    first = cli.invoke(main, ["analyze", "contributions", str(store)])
    assert first.exit_code == 0, first.output
    created = json.loads(cached(store, "contributions").attrs["depthcache_analysis"])["created"]
    again = run("contributions", str(store))
    assert json.loads(again.attrs["depthcache_analysis"])["created"] == created  # cached, not recomputed
    forced = cli.invoke(main, ["analyze", "contributions", str(store), "--force"])
    assert forced.exit_code == 0
    recreated = json.loads(cached(store, "contributions").attrs["depthcache_analysis"])["created"]
    assert recreated != created
    lens = cli.invoke(main, ["analyze", "logit-lens", str(store), "-p", "include_first=true"])
    assert lens.exit_code == 0 and "kl_mean" in lens.output
    listing = cli.invoke(main, ["analyze", "list"]).output
    assert all(name in listing for name in ("contributions", "logit-lens", "effective-depth"))
    for name, pngs in (("contributions", {"contributions.png", "contributions-by-position.png"}),
                       ("logit-lens", {"logit-lens.png"}), ("effective-depth", {"effective-depth.png"})):
        out = cli.invoke(main, ["plot", name, str(store), "--out", str(tmp_path / "plots")])
        assert out.exit_code == 0, out.output
        assert {Path(p).name for p in out.output.split()} == pngs
    assert all((tmp_path / "plots" / p).stat().st_size > 10_000 for p in ("contributions.png", "logit-lens.png"))


def test_missing_mlp_site(tiny_models, tmp_path):
    store = make_store(tmp_path, tiny_models["llama"], "float32", sites=("resid", "attn"))
    result = CliRunner().invoke(main, ["analyze", "contributions", str(store)])
    assert result.exit_code != 0
    assert "mlp_out" in result.output and "--sites" in result.output and "mlp" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("param, message", [("bogus=1", "has no parameter 'bogus'; its parameters"),
                                            ("include_first=maybe", "must be of type bool"),
                                            ("max_tokens=1.5", "must be of type int | None, at least 1")])
def test_bad_parameter_is_a_clear_error_and_saves_nothing(stores, tmp_path, param, message):
    store = fresh(stores["float32"], tmp_path)
    result = CliRunner().invoke(main, ["analyze", "logit-lens", str(store), "-p", param])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (store / "analyses" / "logit-lens").exists()
    assert "max_tokens=null" in CliRunner().invoke(main, ["analyze", "logit-lens", "--help"]).output


def test_newer_schema_refused(stores, tmp_path):
    store = fresh(stores["float32"], tmp_path)
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["depthcache"]["schema_version"] = "1.99"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DepthcacheError, match="newer"):
        run("contributions", str(store))


@pytest.mark.parametrize("name", ["contributions", "logit-lens"])
def test_corrupt_chunk_named_and_nothing_saved(stores, tmp_path, name):
    store = fresh(stores["float32"], tmp_path)
    chunk = store / "resid_pre" / "c" / "0" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[200:204] = bytes(b ^ 0xFF for b in data[200:204])
    chunk.write_bytes(bytes(data))
    with pytest.raises(DepthcacheError) as err:
        run(name, str(store))
    assert "'resid_pre'" in str(err.value) and "chunk 2" in str(err.value)
    group = zarr.open_group(str(store), mode="r")
    assert "analyses" not in group or name not in group["analyses"]
    assert not list((store / "analyses").glob(f".{name}*")) if (store / "analyses").exists() else True
