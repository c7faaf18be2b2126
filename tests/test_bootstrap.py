"""The percentile bootstrap over windows: against direct index resampling, its coverage on synthetic data with a known
mean, and the analyses' intervals against a direct numpy bootstrap of the same windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_documents

from depthcache.analyze import run
from depthcache.analyze.bootstrap import bootstrap_ci, max_replicates, multiplicities, replicates
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.store.reader import open_dataset


def direct(values: list[np.ndarray], n_resamples: int, seed: int, level: float = 0.95,
           reduce=np.mean) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap by explicit index draws: per resample, the windows drawn (numpy's default_rng(seed)
    integers, as documented), their tokens pooled, ``reduce`` over the pooled tokens; numpy quantiles."""
    draws = np.random.default_rng(seed).integers(0, len(values), size=(n_resamples, len(values)))
    stats = np.array([reduce(np.concatenate([values[i] for i in row], axis=-1), axis=-1) for row in draws])
    tail = (1 - level) / 2
    return np.quantile(stats, tail, axis=0), np.quantile(stats, 1 - tail, axis=0)


def test_matches_direct_index_resampling():
    rng = np.random.default_rng(5)
    windows = [rng.normal(3.0, 2.0, size=(4, n)) for n in rng.integers(1, 30, size=12)]  # 4 curves, uneven windows
    sums = np.stack([w.sum(-1) for w in windows])
    counts = np.array([w.shape[-1] for w in windows])
    lo, hi = bootstrap_ci(sums, counts, n_resamples=500, seed=11, level=0.9)
    ref_lo, ref_hi = direct(windows, 500, 11, 0.9)
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-12)
    np.testing.assert_allclose(hi, ref_hi, rtol=1e-12)
    point = sums.sum(0) / counts.sum()
    assert np.all(lo < point) and np.all(point < hi)
    maxima = np.stack([w.max(-1) for w in windows])
    ref = direct(windows, 200, 3, reduce=np.max)
    samples = max_replicates(maxima, 200, 3)
    np.testing.assert_allclose(np.quantile(samples, [0.025, 0.975], axis=0), np.stack(ref), rtol=1e-12)


def test_seeded_and_resample_count():
    a, b = multiplicities(7, 50, seed=1), multiplicities(7, 50, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 7) and (a.sum(1) == 7).all()
    assert not np.array_equal(a, multiplicities(7, 50, seed=2))
    assert replicates(np.ones((7, 2)), np.ones(7), n_resamples=123).shape == (123, 2)


def test_coverage_near_the_level():
    """Windows of 5-60 tokens whose values share a window effect (so tokens of a window are not independent), true
    mean 1.5: the 95 % interval covers it in 90-98 % of 400 seeded repetitions (percentile intervals from 40 windows
    run slightly narrow; resampling tokens instead would cover far less)."""
    rng = np.random.default_rng(0)
    covered, token_covered = 0, 0
    reps = 400
    for rep in range(reps):
        sizes = rng.integers(5, 60, size=40)
        windows = [1.5 + rng.normal(0, 1.0) + rng.normal(0, 0.5, n) for n in sizes]
        sums, counts = np.array([w.sum() for w in windows]), sizes
        lo, hi = bootstrap_ci(sums, counts, n_resamples=1000, seed=rep)
        covered += lo <= 1.5 <= hi
        tokens = np.concatenate(windows)  # the wrong unit, for contrast: every token its own unit
        t_lo, t_hi = bootstrap_ci(tokens, np.ones(len(tokens)), n_resamples=200, seed=rep)
        token_covered += t_lo <= 1.5 <= t_hi
    assert 0.90 <= covered / reps <= 0.98
    assert token_covered / reps < 0.6


def test_nan_resamples_ignored_and_bad_options():
    sums, counts = np.array([1.0, 2.0, 0.0]), np.array([1, 1, 0])
    lo, hi = bootstrap_ci(sums, counts, n_resamples=300)
    assert 1.0 <= lo <= hi <= 2.0
    with pytest.raises(DepthcacheError, match="ci_level"):
        bootstrap_ci(sums, counts, level=1.0)
    with pytest.raises(DepthcacheError, match="ci_resamples"):
        bootstrap_ci(sums, counts, n_resamples=1)


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 store of 8 documents in windows of ≤ 40 tokens and chunks of 32 (windows cross chunk edges)."""
    root = tmp_path_factory.mktemp("intervals")
    write_documents(root / "docs.jsonl", [1 + 2 * (i % 4) for i in range(8)])
    out = root / "f32.zarr"
    extract(ExtractOptions(out=str(out), model=str(tiny_models["llama"]), data=str(root / "docs.jsonl"),
                           dtype="float32", seq_len=40, batch_size=4, chunk_tokens=32, progress=False, device="cpu"))
    return out


def per_window(store: Path, values: np.ndarray) -> list[np.ndarray]:
    """``values`` (..., token) split into the store's windows (seq_id), position 0 left out."""
    ds = open_dataset(store).load()
    keep, seq = ds.position.values >= 1, ds.seq_id.values
    return [values[..., keep & (seq == s)] for s in np.unique(seq)]


def test_analyses_match_a_direct_bootstrap(store):
    ds = open_dataset(store).load()
    h = np.concatenate([ds.resid_pre.values, ds.resid_final.values[None]]).astype(np.float64)
    norms = run("residual-norms", str(store), ci_resamples=400, ci_seed=7)
    ref_lo, ref_hi = direct(per_window(store, np.linalg.norm(h, axis=-1)), 400, 7)
    assert len(norms.window) == len(np.unique(ds.seq_id.values)) > 4
    np.testing.assert_allclose(norms.mean_norm_lo.values, ref_lo, rtol=1e-5)
    np.testing.assert_allclose(norms.mean_norm_hi.values, ref_hi, rtol=1e-5)

    d = ds.attn_out.values.astype(np.float64) + ds.mlp_out.values.astype(np.float64)
    rel = np.linalg.norm(d, axis=-1) / np.linalg.norm(ds.resid_pre.values.astype(np.float64), axis=-1)
    contrib = run("contributions", str(store), ci_resamples=400, ci_seed=7)
    ref_lo, ref_hi = direct(per_window(store, rel), 400, 7)
    np.testing.assert_allclose(contrib.rel_mean_lo.sel(sublayer="layer").values, ref_lo, rtol=1e-5)
    np.testing.assert_allclose(contrib.rel_mean_hi.sel(sublayer="layer").values, ref_hi, rtol=1e-5)

    for result, names in ((norms, ["mean_norm"]), (contrib, ["rel_mean", "cos_mean", "norm_mean"]),
                          (run("logit-lens", str(store)), ["kl_mean", "top1_agreement", "top5_overlap"])):
        for name in names:
            lo, mean, hi = (result[f"{name}{end}"].values for end in ("_lo", "", "_hi"))
            assert np.all(lo <= mean + 1e-12) and np.all(mean <= hi + 1e-12), name
            assert np.any(lo < hi), name
    lens = run("logit-lens", str(store))
    np.testing.assert_allclose(lens.sum_by_window.sum("window").values / float(lens.tokens_by_window.sum()),
                               np.stack([lens.kl_mean, lens.top1_agreement, lens.top5_overlap]), rtol=1e-10)
    depth = run("effective-depth", str(store))
    for key in ("kl_drop", "top5_rise"):
        lo, value, hi = (float(depth[f"{key}_depth{end}"]) for end in ("_lo", "", "_hi"))
        assert lo <= value <= hi or np.isnan(value)
