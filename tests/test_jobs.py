"""Long jobs that finish and survive: progress off a terminal, resume after a kill (prune, igrad, erase), no
deprecated cache reads, batched igrad equal to one point per pass, --layers."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import CORPUS
from transformers.utils import logging as hf_logging

from depthcache.analyze import plotting
from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.evaluate import PruneOptions, evaluate_prune
from depthcache.evaluate.plot import plot_prune
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.locate import LocateOptions, locate, read_map
from depthcache.locate import plot as locate_plot
from depthcache.locate.igrad import completeness_error, igrad_map
from depthcache.locate.maps import encode
from depthcache.locate.partial import partial_path
from depthcache.locate.plot import plot_map
from depthcache.model.loading import load_model
from depthcache.progress import Progress
from depthcache.tasks import TaskItem, write_task_jsonl

ROOT = Path(__file__).resolve().parents[1]
PROMPT, ANSWER = "The quick brown", " fox jumps"


class Clock:
    """A settable clock for Progress."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_off_a_terminal() -> None:
    """Off a terminal: a first line, one per step with the ETA from this run's rate, a per-minute note; the bar
    and --no-progress write no line."""
    stream, clock = io.StringIO(), Clock()
    bar = Progress("igrad", 4, "layers", None, done=1, stream=stream, clock=clock)
    clock.now = 30.0
    bar.update()
    bar.note("layer 2: 96 intervals")
    clock.now = 100.0
    bar.note("layer 2: 128 intervals")
    bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["igrad: 1/4 layers (25%), 0s elapsed",
                     "igrad: 2/4 layers (50%), 30s elapsed, ETA 1m00s",
                     "igrad: 2/4 layers (50%), 1m40s elapsed, ETA 3m20s; layer 2: 128 intervals",
                     "igrad: 3/4 layers (75%), 1m40s elapsed, ETA 50s; layer 2: 128 intervals"]
    fine, clock = io.StringIO(), Clock()
    tokens = Progress("extract", 1000, "tok", None, stream=fine, clock=clock, every=60)
    for _ in range(10):
        clock.now += 10
        tokens.update(100)
    tokens.close()
    assert [line.split(" tok")[0] for line in fine.getvalue().splitlines()] == [
        "extract: 0/1,000", "extract: 600/1,000", "extract: 1,000/1,000"]
    for seconds, expected in ((30, []), (90, ["analyze x: 1/2 tasks (50%)", "analyze x: 2/2 tasks (100%)"])):
        quiet, clock = io.StringIO(), Clock()  # quiet: silent unless the job runs past a minute
        tasks = Progress("analyze x", None, "tasks", None, stream=quiet, clock=clock, every=60, quiet=True)
        tasks.set_total(2)
        clock.now = seconds
        tasks.update()
        tasks.update()
        tasks.close()
        assert [line.split(",")[0] for line in quiet.getvalue().splitlines()] == expected
    for enabled, bar in ((False, False), (True, True)):
        quiet = io.StringIO()
        with Progress("x", 2, enabled=enabled, stream=quiet) as other:
            other.update(2)
        assert ("|" in quiet.getvalue()) == bar and "x: 0/2" not in quiet.getvalue()


def test_cli_progress_lines_on_stderr(tmp_path: Path, tiny_models: dict[str, Path], text_file: Path) -> None:
    """extract with skip runs, igrad and erase through the CLI (not a terminal) write lines to stderr: extraction
    at the start and the end, skip runs and igrad one per run or layer; --no-progress none."""
    model = str(tiny_models["llama"])
    extracted = CliRunner().invoke(main, ["extract", "--model", model, "--data", str(text_file), "--out",
                                          str(tmp_path / "s.zarr"), "--max-tokens", "256", "--seq-len", "32",
                                          "--device", "cpu", "--skip", "each", "--skip-tokens", "40"])
    assert extracted.exit_code == 0, extracted.output
    lines = extracted.stderr.splitlines()
    assert lines[0].startswith("extract: 0/256 tok") and "extract: 256/256 tok (100%)" in extracted.stderr
    runs = [line for line in lines if line.startswith("skip runs: ")]
    assert [line.split(",")[0] for line in runs] == [f"skip runs: {k}/4 runs ({25 * k}%)" for k in range(5)]
    assert "run skip_0, 256 baseline tokens (--skip-tokens 40 rounded up to whole 256-token chunks)" in runs[1]
    common = ["--model", model, "--prompt", PROMPT, "--answer", ANSWER, "--device", "cpu"]
    shown = CliRunner().invoke(main, ["igrad", *common, "--out", str(tmp_path / "a.zarr"), "--steps", "8"])
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.stderr.splitlines() if line.startswith("igrad: ") and "layers (" in line]
    assert lines[0].startswith("igrad: 0/4 layers (0%)") and lines[-1].startswith("igrad: 4/4 layers (100%)")
    assert any("ETA" in line for line in lines) and len(lines) >= 5
    quiet = CliRunner().invoke(main, ["erase", *common, "--out", str(tmp_path / "b.zarr"), "--no-progress",
                                      "--reference-windows", "1"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output


class Records(logging.Handler):
    """Keeps every record logged to it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_analyses_report_progress(tiny_models: dict[str, Path], text_file: Path, tmp_path: Path) -> None:
    """analyze (dask tasks) and layer-map (its own blocks) show a bar with --progress; quick ones write no line by
    default."""
    store = str(tmp_path / "s.zarr")
    extract(ExtractOptions(out=store, model=str(tiny_models["llama"]), data=str(text_file), sites=("resid",),
                           dtype="float32", seq_len=16, batch_size=8, chunk_tokens=64, max_tokens=400,
                           progress=False, device="cpu"))
    shown = CliRunner().invoke(main, ["analyze", "residual-norms", store, "--progress"])
    assert shown.exit_code == 0 and "analyze residual-norms" in shown.stderr and "tasks" in shown.stderr, shown.output
    mapped = CliRunner().invoke(main, ["analyze", "layer-map", store, store, "--progress"])
    assert mapped.exit_code == 0 and "layer-map" in mapped.stderr and "blocks" in mapped.stderr, mapped.output
    quick = CliRunner().invoke(main, ["analyze", "residual-norms", store, "--force"])
    assert quick.exit_code == 0 and quick.stderr == "", quick.stderr


def test_prune_reads_no_deprecated_cache_name(tiny_models: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune run with warnings as errors, and no 'deprecated' message from transformers' own logger (which does
    not propagate, and warns once per process: its memory is cleared first so the check can fail); its chart has
    the chance line and a tick per step naming the layer removed."""
    task = write_task_jsonl(items(4), tmp_path / "task.jsonl")
    logger = hf_logging.get_logger("transformers")
    handler = Records()
    logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = evaluate_prune(PruneOptions(task=str(task), model=str(tiny_models["llama"]), layers="2-3", n=None,
                                             max_new_tokens=3, batch_size=2, device="cpu", progress=False))
    finally:
        logger.removeHandler(handler)
    assert ds.sizes["step"] == 3 and np.isfinite(ds.mean_gold_logprob.values).all()
    assert not [r.getMessage() for r in handler.records if "deprecated" in r.getMessage()]
    figures = kept_figures(monkeypatch, plotting)
    plot_prune(ds, tmp_path)
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0\nfull", f"1\nL{ds.removed_layer.values[1]}",
                                                            f"2\nL{ds.removed_layer.values[2]}"]
    chance = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    expected = np.mean([1 / len(it.choices) for it in items(4) if it.choices])
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(expected)


def items(n: int, long: bool = False) -> list[TaskItem]:
    """``n`` task items made from the tiny corpus, four choices each (long: prompts of ~100 tokens)."""
    made = []
    for i in range(n):
        words = " ".join(CORPUS[(i + k) % 4] for k in range(4 if long else 1)).split()
        cut = len(words) - 1 - i % 3
        made.append(TaskItem(f"i{i}", " ".join(words[:cut]), " " + words[cut],
                             (" " + words[cut], " fox", " layer", " depth") if words[cut] not in ("fox", "layer",
                                                                                                  "depth") else ()))
    return made


def run_killed(args: list[str], marker: Path, pattern: str, final: Path) -> None:
    """Start ``depthcache ARGS`` in a subprocess, SIGKILL it once ``marker`` holds a file matching ``pattern``,
    and check that it was interrupted (no final output) with something saved."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "depthcache.cli", *args, "--no-progress"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (marker.is_dir() and any(marker.glob(pattern))):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "nothing was saved in 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not final.exists(), "the run finished before it was killed: give it more work"


def test_prune_resumes_after_a_kill(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Kill a pruning run after its first step, resume it: the outputs equal an uninterrupted run's."""
    task = write_task_jsonl(items(24), tmp_path / "task.jsonl")
    opts = dict(task=str(task), model=str(tiny_models["llama"]), layers="1-3", n=None, max_new_tokens=8,
                batch_size=4, device="cpu", progress=False)
    out = tmp_path / "killed"
    args = ["evaluate", "prune", "--task", str(task), "--model", opts["model"], "--layers", "1-3",
            "--max-new-tokens", "8", "--batch-size", "4", "--device", "cpu"]
    run_killed([*args, "--out", str(out)], out / "prune.partial", "step-*.json", out / "prune.zarr")
    saved = len(list((out / "prune.partial").glob("step-*.json")))
    with pytest.raises(DepthcacheError, match="continue it with --resume"):
        evaluate_prune(PruneOptions(**opts, out=str(out)))
    # the resumed and the uninterrupted run each in a fresh process, like the killed one: the same torch settings
    # (threads) everywhere, so equal means bit-identical
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra in (["--out", str(out), "--resume"], ["--out", str(tmp_path / "whole")]):
        subprocess.run([sys.executable, "-m", "depthcache.cli", *args, *extra, "--no-progress"], env=env, cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
    assert 1 <= saved < 4 and not (out / "prune.partial").exists()
    resumed, whole = (xr.open_dataset(folder / "prune.zarr", engine="zarr", consolidated=False).load()
                      for folder in (out, tmp_path / "whole"))
    xr.testing.assert_identical(resumed.drop_attrs(), whole.drop_attrs())
    assert (out / "prune.csv").read_text() == (tmp_path / "whole" / "prune.csv").read_text()
    with pytest.raises(DepthcacheError, match="another model, task items or options"):
        bad = tmp_path / "bad"
        (bad / "prune.partial").mkdir(parents=True)
        (bad / "prune.partial" / "job.json").write_text("{}")
        evaluate_prune(PruneOptions(**opts, out=str(bad), resume=True))


@pytest.mark.parametrize("kind", ["igrad", "erasure"])
def test_maps_resume_after_a_kill(kind: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Kill erase/igrad after its first saved layer, resume: the map equals an uninterrupted run's; a resume with
    other options is refused."""
    model = str(tiny_models["llama"])
    task = write_task_jsonl(items(4, long=True), tmp_path / "task.jsonl")
    extra = ["--steps", "128", "--max-steps", "128", "--batch-size", "16"] if kind == "igrad" else \
        ["--reference-windows", "1", "--batch-size", "8"]
    out = tmp_path / "killed.zarr"
    run_killed(["igrad" if kind == "igrad" else "erase", "--model", model, "--task", str(task), "--layers", "1-3",
                "--device", "cpu", "--out", str(out), *extra], partial_path(str(out)), "item*.npz", out)
    saved = len(list(partial_path(str(out)).glob("item*.npz")))
    options = dict(model=model, task=str(task), layers="1-3", device="cpu", progress=False,
                   **({"steps": 128, "max_steps": 128, "batch_size": 16} if kind == "igrad" else
                      {"reference_windows": 1, "batch_size": 8}))
    with pytest.raises(DepthcacheError, match="started with other options"):
        locate(kind, LocateOptions(out=str(out), resume=True, **options | {"layers": "1-2"}))
    resumed = locate(kind, LocateOptions(out=str(out), resume=True, **options))
    whole = locate(kind, LocateOptions(out=str(tmp_path / "whole.zarr"), **options))
    assert 1 <= saved < 12 and not partial_path(str(out)).exists()
    assert list(resumed.layer.values) == [1, 2, 3]
    xr.testing.assert_identical(resumed.drop_attrs(), whole.drop_attrs())
    xr.testing.assert_identical(read_map(out).drop_attrs(), read_map(tmp_path / "whole.zarr").drop_attrs())


def test_igrad_batched_equals_one_point_per_pass(tiny_models: dict[str, Path]) -> None:
    """64 points of the path per forward/backward pass = one point per pass (float tolerance), same refinement, and
    completeness holds for both."""
    loaded = load_model(str(tiny_models["qwen2"]))
    prompt = encode(loaded.tokenizer, PROMPT, ANSWER, 256)
    batched = igrad_map(loaded.model, prompt, layers=[0, 2], steps=16, batch_size=64, tolerance=1e-3)
    single = igrad_map(loaded.model, prompt, layers=[0, 2], steps=16, batch_size=1, tolerance=1e-3)
    assert list(batched.layer.values) == [0, 2]
    np.testing.assert_array_equal(batched.intervals.values, single.intervals.values)
    np.testing.assert_allclose(batched.attribution.values, single.attribution.values, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batched.output_difference.values, single.output_difference.values, atol=1e-7)
    assert completeness_error(batched) <= 1e-3 and completeness_error(single) <= 1e-3
    assert np.abs(batched.attribution.values).max() > 1e-4


def test_erase_layers_pick_rows(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                               ) -> None:
    """--layers 1,3 maps exactly those rows, equal to the same rows of a full map; the heatmap's ticks name them."""
    base = dict(model=str(tiny_models["gpt2"]), prompt=PROMPT, answer=ANSWER, device="cpu", reference_windows=1,
                progress=False)
    some = locate("erasure", LocateOptions(out=str(tmp_path / "some.zarr"), layers="1,3", **base))
    every = locate("erasure", LocateOptions(out=str(tmp_path / "all.zarr"), **base))
    assert list(some.layer.values) == [1, 3] and json.dumps(some.relative_depth.values.tolist()) == "[0.25, 0.75]"
    np.testing.assert_array_equal(some.max_prob_change.values, every.max_prob_change.sel(layer=[1, 3]).values)
    figures = kept_figures(monkeypatch, locate_plot)
    plot_map(read_map(tmp_path / "some.zarr"), "erasure", tmp_path)
    assert [t.get_text() for t in figures[0].axes[0].get_yticklabels()] == ["1", "3"]


def kept_figures(monkeypatch: pytest.MonkeyPatch, module: object) -> list:
    """The figures ``module.save`` is handed from now on, kept open instead of written."""
    figures: list = []
    monkeypatch.setattr(module, "save", lambda fig, folder, name: figures.append(fig) or Path(folder) / name)
    return figures
