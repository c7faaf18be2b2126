"""Layer-map statistics: streamed from two live models (map-stats), built from two stores, merged, resumed, fitted.

Checked against direct numpy sums over the stores' rows and against each other: the stream and the stores agree to
1e-9, two workers merged equal one run, a killed and resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_documents

from depthcache.analyze import layer_map as lm
from depthcache.analyze import run
from depthcache.cli import main
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.map_stats import Accumulator, DeviceMoments, MapStatsOptions, map_stats
from depthcache.store import map_stats as ms
from depthcache.store.reader import open_dataset

SEQ, BATCH, TOKENS = 16, 8, 1200
COMMON = dict(seq_len=SEQ, batch_size=BATCH, max_tokens=TOKENS, device="cpu", progress=False)
STREAM = dict(test_tokens=150, val_tokens=120, product_rows=100, curve_start=100)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Documents, a 2-layer pruned copy of the tiny Llama, and float32 stores of both over the same windows."""
    root = tmp_path_factory.mktemp("mapstats")
    data = write_documents(root / "docs.jsonl", [3 + i % 5 for i in range(40)])
    result = CliRunner().invoke(main, ["prune-copy", "--model", str(tiny_models["llama"]), "--out",
                                       str(root / "pruned")])
    assert result.exit_code == 0, result.output
    paths = {"root": root, "data": data, "deep": tiny_models["llama"], "shallow": root / "pruned"}
    for name in ("shallow", "deep"):
        extract(ExtractOptions(out=str(root / f"{name}.zarr"), model=str(paths[name]), data=str(data),
                               sites=("resid",), dtype="float32", chunk_tokens=256, **COMMON))
        paths[f"{name}_store"] = root / f"{name}.zarr"
    return paths


def stream(setup: dict[str, Path], out: Path, **kw: object) -> ms.MapStats:
    """Run map-stats on the pair into ``out`` and load what it saved."""
    opts = dict(out=str(out), shallow=str(setup["shallow"]), deep=str(setup["deep"]), data=str(setup["data"]),
                **COMMON, **STREAM)
    map_stats(MapStatsOptions(**(opts | kw)))
    return ms.load_stats(out, lazy_rows=False)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the largest magnitude."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def assert_same_sums(a: ms.Moments, b: ms.Moments, rtol: float) -> None:
    """Every training sum of ``a`` equals ``b``'s to ``rtol`` (relative to each array's largest value)."""
    assert a.n == b.n
    for name in ("sx", "gxx", "sy", "syy", "gxy"):
        assert relative(getattr(a, name), getattr(b, name)) <= rtol, name


def test_stream_equals_stores_and_direct_sums(setup: dict[str, Path], tmp_path: Path) -> None:
    streamed = stream(setup, tmp_path / "s", products="float64")
    saved = tmp_path / "from-stores"
    result = run("layer-map", str(setup["shallow_store"]), str(setup["deep_store"]), dtype="float64",
                 product_rows=100, curve_start=100, test_tokens=150, val_tokens=120, save_stats=str(saved), force=True)
    stored = ms.load_stats(saved, lazy_rows=False)
    assert_same_sums(streamed.train, stored.train, 1e-9)
    np.testing.assert_array_equal(streamed.shift.x, stored.shift.x)
    np.testing.assert_array_equal(streamed.heldout_window, stored.heldout_window)
    np.testing.assert_array_equal(streamed.heldout_x, stored.heldout_x)
    np.testing.assert_array_equal(streamed.heldout_y, stored.heldout_y)
    # the sums are what they say: direct float64 sums over the stores' training rows, shifted
    a, b = (open_dataset(p).load() for p in (setup["shallow_store"], setup["deep_store"]))
    x = np.concatenate([a.resid_pre.values, a.resid_final.values[None]]).transpose(1, 0, 2).astype(np.float64)
    y = np.concatenate([b.resid_pre.values, b.resid_final.values[None]]).transpose(1, 0, 2).astype(np.float64)
    split = lm.split_rows_like_map_stats(b.seq_id.values, False, 150, 120)
    xt, yt = x[split == ms.TRAIN] - stored.shift.x, y[split == ms.TRAIN] - stored.shift.y
    direct = ms.Moments(len(xt), xt.sum(0), np.einsum("kgd,kge->gde", xt, xt), yt.sum(0),
                        np.square(yt).sum((0, 2)), xt.reshape(len(xt), -1).T @ yt.reshape(len(yt), -1))
    assert_same_sums(stored.train, direct, 1e-12)
    # fitted from the statistics alone = fitted from the stores
    fitted = run("layer-map", str(tmp_path / "s"), dtype="float64")
    for name in ("r2", "rel_error", "penalty", "r2_lo", "r2_hi"):
        np.testing.assert_allclose(fitted[name].values, result[name].values, rtol=1e-9, err_msg=name)
    np.testing.assert_array_equal(fitted.curve_tokens.values, result.curve_tokens.values)
    np.testing.assert_allclose(fitted.curve_r2.values, result.curve_r2.values, rtol=1e-9)
    one_source_at_a_time = run("layer-map", str(tmp_path / "s"), dtype="float64", memory_gib=1e-9)
    assert one_source_at_a_time.attrs["passes"] == 3
    for name in ("r2", "rel_error", "penalty", "r2_lo", "curve_r2"):
        np.testing.assert_allclose(one_source_at_a_time[name].values, fitted[name].values, rtol=1e-12, err_msg=name)


def test_curve_points_are_the_sums_of_the_first_training_windows(setup: dict[str, Path], tmp_path: Path) -> None:
    final = stream(setup, tmp_path / "s")
    points = ms.curve_points(tmp_path / "s")
    assert [p.n for p in points] == sorted(p.n for p in points) and len(points) >= 3
    assert all(p.n >= 100 * 2**k for k, p in enumerate(points)) and points[-1].n < final.train.n
    result = run("layer-map", str(tmp_path / "s"))
    assert result.curve_tokens.values.tolist() == [p.n for p in points]
    assert np.isfinite(result.curve_r2.values).all()


def test_self_pair_maps_each_layer_onto_itself(setup: dict[str, Path], tmp_path: Path) -> None:
    args = ["map-stats", "--shallow", str(setup["deep"]), "--deep", str(setup["deep"]), "--data", str(setup["data"]),
            "--out", str(tmp_path / "self"), "--seq-len", str(SEQ), "--max-tokens", str(TOKENS), "--device", "cpu",
            "--test-tokens", "150", "--val-tokens", "120", "--curve-start", "100", "--no-progress"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    shown = CliRunner().invoke(main, ["analyze", "layer-map", str(tmp_path / "self")])
    assert shown.exit_code == 0, shown.output
    result = run("layer-map", str(tmp_path / "self"))
    assert (result.best_shallow_layer.values == result.deep_layer.values).all()
    diagonal = np.diag(result.r2.values)
    assert (diagonal > 0.99).all(), diagonal
    assert ((result.r2_lo.values <= result.r2.values) & (result.r2.values <= result.r2_hi.values)).all()
    assert len(list((tmp_path / "self" / "fits").iterdir())) == 1  # analyze fitted once; run and plot reuse it
    drawn = CliRunner().invoke(main, ["plot", "layer-map", str(tmp_path / "self"), "--out", str(tmp_path / "fig")])
    assert drawn.exit_code == 0, drawn.output
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"layer-map.png", "layer-map-curve.png"}


def test_two_workers_merged_equal_one_run(setup: dict[str, Path], tmp_path: Path) -> None:
    whole = stream(setup, tmp_path / "one")
    for index in (0, 1):
        stream(setup, tmp_path / f"w{index}", worker_index=index, num_workers=2)
    merged = CliRunner().invoke(main, ["merge-stats", str(tmp_path / "merged"), str(tmp_path / "w0"),
                                       str(tmp_path / "w1")])
    assert merged.exit_code == 0, merged.output
    both = ms.load_stats(tmp_path / "merged", lazy_rows=False)
    assert_same_sums(both.train, whole.train, 1e-12)
    np.testing.assert_array_equal(both.heldout_window, whole.heldout_window)
    np.testing.assert_array_equal(both.heldout_x, whole.heldout_x)
    refused = CliRunner().invoke(main, ["merge-stats", str(tmp_path / "again"), str(tmp_path / "w0"),
                                        str(tmp_path / "w0")])
    assert refused.exit_code == 2 and "overlap" in refused.output


def read_all(folder: Path) -> dict[str, bytes]:
    """Every array of a statistics folder's sums and curve points, as raw decoded bytes."""
    out = {}
    for sub in [folder / "sums", *sorted((folder / "curve").iterdir())]:
        ds = ms.open_result(str(sub))
        out |= {f"{sub.name}/{k}": ds[k].values.tobytes() for k in ds.data_vars}
        out[f"{sub.name}/n"] = str(ds.attrs["train_n"]).encode()
    return out


def test_kill_then_resume_is_bit_identical(setup: dict[str, Path], tmp_path: Path) -> None:
    args = [sys.executable, "-m", "depthcache.cli", "map-stats", "--shallow", str(setup["shallow"]), "--deep",
            str(setup["deep"]), "--data", str(setup["data"]), "--seq-len", str(SEQ), "--max-tokens", str(TOKENS),
            "--device", "cpu", "--test-tokens", "150", "--val-tokens", "120", "--product-rows", "20",
            "--curve-start", "100", "--checkpoint-minutes", "0", "--no-progress", "--resume"]
    reference = subprocess.run([*args, "--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "sums").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = ms.load_stats(killed)
    assert not partial.progress["complete"]  # killed midway: a checkpoint, not the end
    resumed = subprocess.run([*args, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_all(tmp_path / "ref"), read_all(killed)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_refusals_are_one_line(setup: dict[str, Path], tiny_models, tmp_path: Path) -> None:
    base = ["map-stats", "--data", str(setup["data"]), "--seq-len", str(SEQ), "--max-tokens", str(TOKENS),
            "--device", "cpu", "--no-progress", "--test-tokens", "150", "--val-tokens", "120"]
    cases = [
        (["--shallow", str(tiny_models["gpt2"]), "--deep", str(setup["deep"]), "--out", str(tmp_path / "a")],
         "tokenizers differ"),
        (["--shallow", str(setup["shallow"]), "--deep", str(setup["deep"]), "--out", str(tmp_path / "b"),
          "--memory-gib", "0.0001"], "shallow boundaries fit"),
        (["--shallow", str(setup["shallow"]), "--deep", str(setup["deep"]), "--out", str(setup["deep_store"])],
         "exists"),
        (["--shallow", str(setup["shallow"]), "--deep", str(setup["deep"]), "--out", str(setup["deep_store"]),
          "--resume"], "not a layer-map statistics folder"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_device_accumulator_matches_host_sums() -> None:
    import torch

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 3, 8)).astype(np.float32), rng.normal(size=(300, 4, 5)).astype(np.float32)
    host = Accumulator(ms.Moments.zeros(3, 8, 4, 5), None)
    device = Accumulator(ms.Moments.zeros(3, 8, 4, 5), torch.device("cpu"))
    for part in (slice(0, 120), slice(120, 300)):
        host.add(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
        device.add(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    assert isinstance(device.device_sums, DeviceMoments)
    assert_same_sums(device.moments(), host.moments(), 1e-6)


def test_jackknife_equals_a_direct_leave_one_group_out() -> None:
    rng = np.random.default_rng(1)
    sums = lm.TestSums.zeros(6, 2, 3, 4)
    rows = []
    for k in range(6):
        y = rng.normal(size=(40, 3, 4)) + k * 0.1
        err = rng.normal(size=(2, 40, 3, 4)) * 0.3
        sums.n[k], sums.sy[k], sums.syy[k] = 40, y.sum(0), np.square(y).sum((0, 2))
        sums.sse[k] = np.square(err).sum((1, 3))
        sums.rel[k] = (np.linalg.norm(err, axis=3) / np.linalg.norm(y, axis=2)).sum(1)
        rows.append((y, err))
    got = lm.jackknife(sums)

    def r2(keep: list[int]) -> np.ndarray:
        y = np.concatenate([rows[k][0] for k in keep])
        err = np.concatenate([rows[k][1] for k in keep], axis=1)
        sst = np.square(y - y.mean(0)).sum((0, 2))
        return 1 - np.square(err).sum((1, 3)) / sst

    full = r2(list(range(6)))
    loo = np.stack([r2([j for j in range(6) if j != k]) for k in range(6)])
    se = np.sqrt(5 / 6 * np.square(loo - loo.mean(0)).sum(0))
    q = lm.student_t_quantile(0.975, 5)
    assert q == pytest.approx(2.570582, abs=1e-5)
    assert lm.student_t_quantile(0.975, 19) == pytest.approx(2.093024, abs=1e-5)
    np.testing.assert_allclose(got["r2_lo"], full - q * se, rtol=1e-10)
    np.testing.assert_allclose(got["r2_hi"], full + q * se, rtol=1e-10)


def test_product_groups_close_at_rows_and_curve_points() -> None:
    groups = ms.product_groups([10, 10, 10, 10, 10, 10, 10], 25, 15)
    assert groups == [(0, 2, True), (2, 3, True), (3, 6, True), (6, 7, False)]
    assert ms.product_groups([5, 5], 100, 0) == [(0, 2, False)]


def test_damaged_or_hostile_statistics_are_refused_in_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    good = tmp_path / "good"
    stream(setup, good)
    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    chunk = max((p for p in (flipped / "sums" / "train_gxy").rglob("*") if p.is_file() and p.name != "zarr.json"),
                key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    hostile = tmp_path / "hostile"
    shutil.copytree(good, hostile)
    meta = json.loads((hostile / "zarr.json").read_text())
    meta["attributes"]["depthcache"]["shallow_layers"] = list(range(10_000))
    (hostile / "zarr.json").write_text(json.dumps(meta))
    for folder, message in ((flipped, "cannot be read"), (hostile, "map-stats schema"),
                            (setup["deep_store"], "two stores (SHALLOW DEEP) or one statistics folder")):
        result = CliRunner().invoke(main, ["analyze", "layer-map", str(folder)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_offloaded_models_give_the_same_statistics(setup: dict[str, Path], tmp_path: Path) -> None:
    from depthcache.model.placement import Placement

    folder = setup["deep"]
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    placed = stream(setup, tmp_path / "offloaded", placement=Placement(max_memory=f"cpu={weights // 3}B",
                                                                       offload_folder=str(tmp_path / "off")))
    plain = stream(setup, tmp_path / "plain")
    where = ms.read_stats_attrs(tmp_path / "offloaded")["placement"]
    assert where["deep"]["device_map"].get("disk", 0) >= 1, where  # layers really read from disk
    assert_same_sums(placed.train, plain.train, 0.0)
    np.testing.assert_array_equal(placed.heldout_y, plain.heldout_y)
