"""compare: relative-depth axes and table values of three tiny models of different depths against direct float64
numpy computations from each store's arrays and against each store's own analysis results; bad input."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import save_tiny_model, write_documents
from test_analyses import reference_lens

from depthcache.analyze import run
from depthcache.analyze.compare import compare
from depthcache.cli import main
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.skip_runs import SkipOptions, extract_skips
from depthcache.store.reader import open_dataset

SKIP_TOKENS = 64
# (folder, architecture, layers, seed, max tokens): two Llamas sharing a tokenizer and tokens (a layer-map pair) and
# a Qwen2 with its own tokenizer (no BOS) and fewer tokens; position 0 is excluded everywhere (the default)
MODELS = (("llama2", "llama", 2, 1, None), ("llama3", "llama", 3, 2, None), ("qwen4", "qwen2", 4, 3, 96))


def options(root: Path, model: Path, max_tokens: int | None, sites: tuple[str, ...] = ("resid", "attn", "mlp"),
            name: str | None = None) -> ExtractOptions:
    """Extraction options of a test store of the shared documents (windows of ≤ 40 tokens, chunks of 64)."""
    return ExtractOptions(out=str(root / f"{name or model.name}.zarr"), model=str(model), data=str(root / "docs.jsonl"),
                          dtype="float32", sites=sites, seq_len=40, batch_size=4, chunk_tokens=64,
                          max_tokens=max_tokens, progress=False, device="cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three stores with current-variant skip runs of every layer, plus the models' folders."""
    root = tmp_path_factory.mktemp("compare")
    write_documents(root / "docs.jsonl", [1, 3, 5, 2, 4])
    out = {}
    for name, arch, layers, seed, max_tokens in MODELS:
        model = save_tiny_model(arch, root / name, seed=seed, n_layers=layers)
        extract_skips(options(root, model, max_tokens), SkipOptions("each", tokens=SKIP_TOKENS))
        out[name], out[f"{name}-model"] = root / f"{name}.zarr", model
    return out


@pytest.fixture(scope="module")
def compared(built, tmp_path_factory: pytest.TempPathFactory):
    """compare() over the three stores, every analysis."""
    return compare([str(built[name]) for name, *_ in MODELS], tmp_path_factory.mktemp("compare-out"))


@functools.cache
def whole_layer_rel(store: Path) -> np.ndarray:
    """Per layer: mean over tokens (position ≥ 1) of ‖attn + mlp‖ / ‖resid_pre‖, float64 from stored arrays."""
    ds = open_dataset(store).load()
    keep = ds.position.values >= 1
    h = ds.resid_pre.values.astype(np.float64)[:, keep]
    d = (ds.attn_out.values.astype(np.float64) + ds.mlp_out.values.astype(np.float64))[:, keep]
    return (np.linalg.norm(d, axis=-1) / np.linalg.norm(h, axis=-1)).mean(axis=1)


def later_effects(store: Path) -> np.ndarray:
    """Per skipped layer s: mean over l > s of the max over tokens (position ≥ 1) of ‖Δd_l‖ / max(‖d_l‖, 1e-6)
    (the last layer: NaN, no later layer)."""
    base = open_dataset(store).load()
    depth = base.sizes["layer"]
    d_base = base.attn_out.values.astype(np.float64) + base.mlp_out.values.astype(np.float64)
    out = np.full(depth, np.nan)
    for s in range(depth - 1):
        r = open_dataset(store, group=f"runs/skip_{s}").load()
        n = r.attrs["depthcache"]["intervention"]["baseline_tokens"]
        keep = base.position.values[:n] >= 1
        d_run = r.attn_out.values.astype(np.float64) + r.mlp_out.values.astype(np.float64)
        delta = np.linalg.norm(d_run - d_base[s:, :n], axis=-1) / np.maximum(np.linalg.norm(d_base[s:, :n], axis=-1),
                                                                             1e-6)
        out[s] = delta[1:, keep].max(axis=1).mean()
    return out


def halves(values: np.ndarray, depth: int) -> list[float]:
    """Means over layers l < L/2 and l ≥ L/2 of per-layer ``values`` (NaN ignored; NaN when none is left)."""
    layers = np.arange(len(values))
    parts = [values[(2 * layers < depth) & np.isfinite(values)], values[(2 * layers >= depth) & np.isfinite(values)]]
    return [part.mean() if part.size else np.nan for part in parts]


def test_relative_depth_axes(compared, built) -> None:
    assert [Path(p).name for p in compared.figures] == [
        "contributions.png", "residual-norms.png", "logit-lens.png", "skip-effects.png", "effective-depth.png",
        "layer-map.png"]
    assert all(p.stat().st_size > 10_000 for p in compared.figures)
    labels = ["llama2 (2 layers)", "llama3 (3 layers)", "qwen4 (4 layers)"]
    for name, per_layer, boundaries in (("contributions", True, False), ("residual-norms", False, True),
                                        ("logit-lens", False, True), ("skip-effects", True, False)):
        for panel in compared.panels[name]:
            assert [line.label for line in panel.lines] == labels
            for line, (_, _, depth, _, _) in zip(panel.lines, MODELS):
                np.testing.assert_array_equal(line.x, np.arange(depth + boundaries) / depth, err_msg=name)
    contrib = compared.panels["contributions"][0].lines
    for line, (name, *_) in zip(contrib, MODELS):
        np.testing.assert_allclose(line.y, whole_layer_rel(built[name]), rtol=1e-5)
    (best, error) = compared.panels["layer-map"]
    assert [line.label for line in best.lines] == ["llama2 (2 layers) → llama3 (3 layers)"]  # qwen4: other tokenizer
    np.testing.assert_array_equal(best.lines[0].x, np.arange(4) / 3)
    assert set(np.round(best.lines[0].y * 2, 9)) <= {0.0, 1.0, 2.0}  # boundaries of the 2-layer model
    cutoffs = compared.panels["effective-depth"][0]
    assert cutoffs.categories == labels and [len(line.x) for line in cutoffs.lines] == [3, 3, 3]
    np.testing.assert_array_equal(cutoffs.lines[0].x, compared.table.cos_zero_depth)


def test_table_values(compared, built, tmp_path) -> None:
    table = compared.table
    assert table.model.tolist() == ["llama2 (2 layers)", "llama3 (3 layers)", "qwen4 (4 layers)"]
    assert table.layers.tolist() == [2, 3, 4] and table.d_model.tolist() == [64, 64, 64]
    for i, (name, _, depth, _, _) in enumerate(MODELS):
        store, row = built[name], table.iloc[i]
        attrs = open_dataset(store).attrs["depthcache"]
        assert (row.dataset, row.dataset_sha256, row.tokens) == (
            "docs.jsonl", attrs["dataset"]["sha256"][:12], attrs["progress"]["tokens_committed"])
        assert row.tokens == (96 if name == "qwen4" else open_dataset(store).sizes["token"])
        np.testing.assert_allclose([row.rel_first_half, row.rel_second_half],
                                   halves(whole_layer_rel(store), depth), rtol=1e-5)
        np.testing.assert_allclose(row.rel_first_half_from_1, whole_layer_rel(store)[1:(depth + 1) // 2].mean()
                                   if depth > 2 else np.nan, rtol=1e-5)
        np.testing.assert_allclose([row.skip_later_first_half, row.skip_later_second_half],
                                   halves(later_effects(store), depth), rtol=1e-4)
        assert row.skip_tokens == SKIP_TOKENS
        kl = reference_lens(store, include_first=False)["kl"]  # at boundaries 0..L (L: the output)
        boundary = np.arange(depth + 1) / depth
        np.testing.assert_allclose([row.lens_kl_50, row.lens_kl_75, row.lens_kl_last],
                                   [np.interp(0.5, boundary, kl), np.interp(0.75, boundary, kl), kl[depth - 1]],
                                   rtol=1e-4, atol=1e-6)
        own = run("effective-depth", str(store), results_dir=str(tmp_path / name), force=True)  # on its own
        for key in ("cos_zero", "kl_drop", "top5_rise"):
            assert row[f"{key}_layer"] == int(own[f"{key}_layer"])
            np.testing.assert_equal(row[f"{key}_depth"], float(own[f"{key}_depth"]))
    assert table.loc[0, "lens_kl_50"] == pytest.approx(reference_lens(built["llama2"], False)["kl"][1], rel=1e-4)
    folder = compared.figures[0].parent
    pd.testing.assert_frame_equal(pd.read_csv(folder / "compare.csv"), table, check_dtype=False)
    md = (folder / "compare.md").read_text()
    assert compared.summary in md and "![layer-map](layer-map.png)" in md
    assert md.count("\n| llama") == 2 and "| qwen4 (4 layers) | 4 | 64 | docs.jsonl |" in md


def window_draws(store: Path, values: np.ndarray, n: int | None = None) -> list[np.ndarray]:
    """Per window (seq_id) of the first ``n`` tokens, the columns (..., token) of ``values`` at positions ≥ 1."""
    ds = open_dataset(store).load()
    keep, seq = ds.position.values[:n] >= 1, ds.seq_id.values[:n]
    return [values[..., keep & (seq == s)] for s in np.unique(seq)]


def test_table_intervals(compared, built) -> None:
    """Every mean-based statistic lies in its interval (skip_later_*, means of maxima, need not: a resample's max
    cannot exceed the observed one), and two statistics equal a direct numpy bootstrap of the same windows (index
    draws of numpy's default_rng(0), 1,000 resamples, the statistic recomputed per resample)."""
    table = compared.table
    for column in ("cos_zero_depth", "kl_drop_depth", "top5_rise_depth", "rel_first_half", "rel_second_half",
                   "lens_kl_50", "lens_kl_75", "lens_kl_last"):
        lo, value, hi = (table[f"{column}{end}"].to_numpy(float) for end in ("_lo", "", "_hi"))
        known = np.isfinite(value)
        assert np.all(lo[known] <= value[known] + 1e-12) and np.all(value[known] <= hi[known] + 1e-12), column
    for i, (name, _, depth, _, _) in enumerate(MODELS):
        store, row = built[name], table.iloc[i]
        ds = open_dataset(store).load()
        h = ds.resid_pre.values.astype(np.float64)
        d = ds.attn_out.values.astype(np.float64) + ds.mlp_out.values.astype(np.float64)
        windows = window_draws(store, np.linalg.norm(d, axis=-1) / np.linalg.norm(h, axis=-1))
        draws = np.random.default_rng(0).integers(0, len(windows), size=(1000, len(windows)))
        first = 2 * np.arange(depth) < depth
        samples = [np.concatenate([windows[j] for j in row_], axis=-1).mean(-1)[first].mean() for row_ in draws]
        np.testing.assert_allclose([row.rel_first_half_lo, row.rel_first_half_hi],
                                   np.quantile(samples, [0.025, 0.975]), rtol=1e-5)
        base_d, n = d, SKIP_TOKENS
        maxima = []  # per skipped layer s < L - 1: (later layer, token) relative change
        for s in range(depth - 1):
            r = open_dataset(store, group=f"runs/skip_{s}").load()
            d_run = r.attn_out.values.astype(np.float64) + r.mlp_out.values.astype(np.float64)
            delta = np.linalg.norm(d_run - base_d[s:, :n], axis=-1) / np.maximum(
                np.linalg.norm(base_d[s:, :n], axis=-1), 1e-6)
            maxima.append(window_draws(store, delta[1:], n))
        skip_draws = np.random.default_rng(0).integers(0, len(maxima[0]), size=(1000, len(maxima[0])))
        later = np.array([[np.concatenate([per_s[j] for j in row_], axis=-1).max(-1).mean() for per_s in maxima]
                          for row_ in skip_draws])  # (resample, skipped layer)
        skipped = np.arange(depth - 1)
        first_half = later[:, 2 * skipped < depth].mean(1)
        np.testing.assert_allclose([row.skip_later_first_half_lo, row.skip_later_first_half_hi],
                                   np.quantile(first_half, [0.025, 0.975]), rtol=1e-4)
    md = (compared.figures[0].parent / "compare.md").read_text()
    assert f"{table.rel_second_half[0]:.4g} [{table.rel_second_half_lo[0]:.4g}, " in md


def test_cli_results_folder_and_parameters(built, tmp_path) -> None:
    stores = [str(built["llama2"]), str(built["qwen4"])]
    result = CliRunner().invoke(main, ["compare", *stores, "--out", str(tmp_path / "out"), "--analyses",
                                       "logit-lens,residual-norms", "-p", "include_first=true", "--results",
                                       str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("| model | layers | d_model |") and "position 0" not in result.output
    assert (tmp_path / "results" / "qwen4" / "logit-lens").is_dir()
    lens = run("logit-lens", stores[1], results_dir=str(tmp_path / "results" / "qwen4"), include_first=True)
    table = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert table.lens_tokens.tolist() == [open_dataset(stores[0]).sizes["token"], 96]
    assert table.loc[1, "lens_kl_last"] == pytest.approx(float(lens.kl_mean[3]), rel=1e-12)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.csv", "compare.md", "logit-lens.png",
                                                                     "residual-norms.png"]


@pytest.fixture(scope="module")
def odd(built) -> dict[str, Path]:
    """A store with only the residual, one with only the sublayers, and a full one without skip runs."""
    root = built["llama2"].parent
    model = built["llama2-model"]
    out = {}
    for sites in (("resid",), ("attn", "mlp")):
        opts = options(root, model, 64, sites, name=f"only-{sites[0]}")
        extract(opts)
        out[sites[0]] = Path(opts.out)
    shutil.copytree(built["llama3"], root / "no-runs.zarr", ignore=shutil.ignore_patterns("runs", "analyses"))
    return out | {"no-runs": root / "no-runs.zarr"}


def one_line_error(args: list[str]) -> str:
    """The output of a failing CLI call, checked to be one 'error:' line."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    return result.output


def test_sites_missing_in_one_store_leave_analyses_out(built, odd, tmp_path) -> None:
    done = compare([str(odd["resid"]), str(built["llama3"])], tmp_path, analyses=None)
    assert [p.name for p in done.figures] == ["residual-norms.png", "logit-lens.png"]
    assert [n.split(":")[0] for n in done.notes] == ["contributions left out", "skip-effects left out",
                                                     "effective-depth left out", "layer-map left out"]
    assert "only-resid.zarr lacks attn_out, mlp_out" in done.notes[0]
    assert "contributions left out" in (tmp_path / "compare.md").read_text()
    assert "rel_first_half" not in done.table


@pytest.mark.parametrize("case, message", [
    ("one", "error: compare needs at least two stores, got 1"),
    ("requested", "error: cannot compare contributions: {resid} lacks attn_out, mlp_out (extract with --sites"),
    ("nothing", "error: nothing to compare: contributions left out: {resid} lacks attn_out, mlp_out"),
    ("skips", "error: cannot compare skip-effects: {no-runs} has no current-variant skip runs of the layer: make "
              "them with depthcache extract --out {no-runs} --skip each"),
    ("unknown", "error: compare cannot compare 'multihop'; it compares contributions, residual-norms"),
    ("param", "error: no compared analysis (logit-lens) has a parameter 'variant'"),
])
def test_bad_input_is_one_clear_line(built, odd, tmp_path, case, message) -> None:
    two = [str(built["llama2"]), str(odd["resid"])]
    args = {"one": [str(built["llama2"])], "requested": [*two, "--analyses", "contributions"],
            "nothing": [str(odd["resid"]), str(odd["attn"])],
            "skips": [str(built["llama2"]), str(odd["no-runs"]), "--analyses", "residual-norms,skip-effects"],
            "unknown": [*two, "--analyses", "multihop"],
            "param": [*two, "--analyses", "logit-lens", "-p", "variant=future"]}[case]
    output = one_line_error(["compare", *args, "--out", str(tmp_path / "out")])
    assert output.startswith(message.format(**{k: str(v) for k, v in odd.items()})), output
    assert not (tmp_path / "out").exists()



def test_remote_stores(built, compared, tmp_path, monkeypatch) -> None:
    """URL stores take the same path as local ones (read-only, results in a local folder named after the store);
    fsspec's in-memory filesystem stands in for object storage (tests/test_object_storage.py covers S3 itself)."""
    memory = fsspec.filesystem("memory")
    urls = [f"memory://compare/{name}.zarr" for name in ("llama2", "qwen4")]
    for name, url in zip(("llama2", "qwen4"), urls):  # the baselines only
        memory.put(str(built[name]), url.removeprefix("memory:/"), recursive=True)
        for extra in ("runs", "analyses"):
            memory.rm(url.removeprefix("memory:/") + f"/{extra}", recursive=True)
    before = memory.find("/compare")
    monkeypatch.chdir(tmp_path)
    done = compare(urls, tmp_path / "out", ["logit-lens"])
    assert memory.find("/compare") == before  # only read
    assert (tmp_path / "qwen4.zarr.analyses" / "logit-lens").is_dir()
    local = compared.table.iloc[[0, 2]].reset_index(drop=True)
    pd.testing.assert_frame_equal(done.table.drop(columns="store"), local[done.table.columns].drop(columns="store"))
    assert done.table.store.tolist() == urls
    memory.rm("/compare", recursive=True)
