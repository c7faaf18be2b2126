"""The results cache: one entry per analysis and parameter set, keyed so that equal parameters hit and adding runs
keeps what does not read them; inner analyses follow the caller's results folder and scheduler; the CLI manages it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from test_extract import run as extract_store

from depthcache.analyze import runner
from depthcache.analyze.runner import run
from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions
from depthcache.extraction.skip_runs import SkipOptions, extract_skips
from depthcache.store import io, results
from depthcache.store.complete import missing_chunks
from depthcache.store.io import write_dataset_atomically
from depthcache.store.layout import choose_chunk_tokens
from depthcache.store.reader import Store
from depthcache.store.schema import validate


@pytest.fixture(scope="module")
def base(tiny_models, text_file, tmp_path_factory) -> tuple[Path, dict]:
    """A small store of the tiny Llama and the options it was extracted with."""
    root = tmp_path_factory.mktemp("cache")
    store = extract_store(root, tiny_models["llama"], text_file, max_tokens=128)
    opts = dict(out=str(store), model=str(tiny_models["llama"]), data=str(text_file), dtype="float32", seq_len=32,
                batch_size=3, chunk_tokens=64, progress=False, device="cpu", max_tokens=128)
    return store, opts


def fresh(store: Path, tmp_path: Path) -> Path:
    """A copy of the store without cached results."""
    copy = tmp_path / store.name
    shutil.copytree(store, copy)
    shutil.rmtree(copy / "analyses", ignore_errors=True)
    return copy


def created(result: xr.Dataset) -> str:
    """When a result was computed (its recorded provenance)."""
    return json.loads(result.attrs[results.RESULT_ATTR])["created"]


def invoke(*args: str):  # noqa: ANN201 - click Result
    """Run the CLI in-process, stdout and stderr apart."""
    return CliRunner().invoke(main, list(args))


def test_two_parameter_sets_side_by_side_and_explicit_default_hits(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    full = run("logit-lens", str(store))
    short = run("logit-lens", str(store), max_tokens=40)
    assert int(short.tokens_used) < int(full.tokens_used)
    entries = results.entries(results.places(Store(str(store)))[0], "logit-lens")
    assert sorted(json.dumps(e.params, sort_keys=True) for e in entries) == [
        '{"ci_level": 0.95, "ci_resamples": 1000, "ci_seed": 0, "include_first": false, "layers": "all", '
        '"max_tokens": 40}',
        '{"ci_level": 0.95, "ci_resamples": 1000, "ci_seed": 0, "include_first": false, "layers": "all", '
        '"max_tokens": null}']
    # both are still there: asking again recomputes neither, whatever the spelling of the defaults
    assert created(run("logit-lens", str(store))) == created(full)
    assert created(run("logit-lens", str(store), include_first=False, max_tokens=None)) == created(full)
    assert created(run("logit-lens", str(store), max_tokens=40)) == created(short)
    listing = invoke("analyze", "logit-lens", str(store), "--list-cached")
    assert listing.exit_code == 0 and "2 cached" in listing.output and listing.output.count("[current]") == 2
    info = invoke("info", str(store)).output
    assert "analyses   2 cached:" in info and ('logit-lens  ci_level=0.95, ci_resamples=1000, ci_seed=0, '
                                               'include_first=false, layers="all", max_tokens=40') in info
    cleared = invoke("analyze", "logit-lens", str(store), "--clear", "-p", "max_tokens=40")
    assert cleared.exit_code == 0 and "removed 1 cached result" in cleared.output
    left = results.entries(results.places(Store(str(store)))[0], "logit-lens")
    assert [e.params["max_tokens"] for e in left] == [None]
    assert zarr.open_group(str(store), mode="r")  # the store is still a valid Zarr hierarchy


def test_adding_runs_keeps_baseline_results(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    kept = {name: created(run(name, str(store))) for name in ("contributions", "logit-lens", "effective-depth")}
    extract_skips(ExtractOptions(**(base[1] | {"out": str(store)})), SkipOptions("1", tokens=64))
    assert Store(str(store)).runs() == ["skip_1"]
    for name, when in kept.items():
        assert created(run(name, str(store))) == when, f"{name} was recomputed after adding a run"
    assert "depth use" in invoke("info", str(store)).output
    skips = run("skip-effects", str(store))
    assert json.loads(skips.attrs[results.RESULT_ATTR])["runs"][0] is not None  # it read the runs: keyed by them
    extract_skips(ExtractOptions(**(base[1] | {"out": str(store)})), SkipOptions("2", tokens=64))
    again = run("skip-effects", str(store))
    assert created(again) != created(skips) and again.sizes["skipped_layer"] == 2
    assert created(run("contributions", str(store))) == kept["contributions"]


def test_inner_analyses_use_the_callers_results_folder_and_scheduler(base, tmp_path, monkeypatch) -> None:
    store = fresh(base[0], tmp_path)
    folder = tmp_path / "elsewhere"
    entered = []
    real = runner.scheduler

    def recording(address=None):  # noqa: ANN001, ANN202 - wraps the context manager
        entered.append(address)
        return real(None)

    monkeypatch.setattr(runner, "scheduler", recording)
    result = invoke("analyze", "effective-depth", str(store), "--results", str(folder), "--scheduler", "tcp://x:1")
    assert result.exit_code == 0, result.output
    assert entered == ["tcp://x:1"]  # entered once, by the outer analysis: the inner ones ran inside it
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["contributions", "effective-depth",
                                                                        "logit-lens"]
    assert not (store / "analyses").exists()  # nothing went to the default place
    stored = Store(str(store))
    assert runner.cached("contributions", stored, results_dir=str(folder)) is not None
    assert runner.cached("contributions", stored) is None


def test_old_layout_results_are_recomputed_not_fatal(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    result = run("residual-norms", str(store))
    key = results.entry_key(json.loads(result.attrs[results.RESULT_ATTR])["params"])
    old = store / "analyses" / "residual-norms"
    shutil.rmtree(old)
    result.attrs[results.RESULT_ATTR] = json.dumps(json.loads(result.attrs[results.RESULT_ATTR]) | {"params": {}})
    result.to_zarr(old, zarr_format=3, consolidated=False)  # what depthcache 0.1 wrote: one dataset per analysis
    info = invoke("info", str(store))
    assert info.exit_code == 0 and "residual-norms  (old format)" in info.output
    report = invoke("report", str(store), "--out", str(tmp_path / "r.html"))
    assert report.exit_code == 0, report.output
    again = run("residual-norms", str(store))
    assert created(again) != created(result)
    assert sorted(p.name for p in old.iterdir() if p.is_dir()) == [key]  # the old arrays are gone


def test_analyze_prints_a_summary_and_full_prints_everything(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    short = invoke("analyze", "contributions", str(store))
    assert short.exit_code == 0, short.output
    assert "rel_mean" in short.output and "--full" in short.output and len(short.output.splitlines()) < 60
    full = invoke("analyze", "contributions", str(store), "--full")
    assert "rel_mean_by_position" in full.output and len(full.output.splitlines()) > len(short.output.splitlines())
    depth = invoke("analyze", "effective-depth", str(store))
    assert "top-5 overlap > 0.2:" in depth.output


def test_old_plot_order_works_with_a_note(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    new = CliRunner().invoke(main, ["plot", "residual-norms", str(store), "--out", str(tmp_path / "a")])
    assert new.exit_code == 0 and "deprecated" not in new.stderr, new.output
    old = CliRunner().invoke(main, ["plot", str(store), "residual-norms", "--out", str(tmp_path / "b")])
    assert old.exit_code == 0, old.output
    assert old.stderr.startswith("note: `depthcache plot STORE NAME` is deprecated")
    assert f"depthcache plot residual-norms {store}" in old.stderr
    assert old.stdout == new.stdout.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    usage = CliRunner().invoke(main, ["plot", "--help"]).output
    assert "Usage: main plot [OPTIONS] NAME STORE" in usage


def test_default_chunk_is_never_longer_than_the_store(tiny_models, text_file, tmp_path) -> None:
    assert choose_chunk_tokens(4, 64, 4) == 32768 and choose_chunk_tokens(4, 64, 4, n_tokens=128) == 128
    store = extract_store(tmp_path, tiny_models["llama"], text_file, max_tokens=128, chunk_tokens=None)
    info = invoke("info", str(store)).output
    assert "shards of 128 tokens × 4 layers" in info
    assert sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) < 2**20  # not 100 MiB of fill values


def test_info_lists_runs_in_natural_order(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    extract_skips(ExtractOptions(**(base[1] | {"out": str(store)})), SkipOptions("1", tokens=64))
    for name in ("skip_10", "skip_2"):  # same run under other names: only the listing order is under test
        shutil.copytree(store / "runs" / "skip_1", store / "runs" / name)
    assert "runs       skip_1, skip_2, skip_10\n" in invoke("info", str(store)).output


def entry_folder(store: Path, name: str) -> Path:
    """The folder of the one cached result of analysis ``name`` inside a store."""
    (folder,) = [p for p in (store / "analyses" / name).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def test_a_result_missing_a_chunk_is_recomputed_never_served(base, tmp_path, monkeypatch) -> None:
    store = fresh(base[0], tmp_path)
    first = run("contributions", str(store))
    chunk = entry_folder(store, "contributions") / "rel_mean" / "c" / "0" / "0"
    chunk.unlink()
    where = f"analyses/contributions/{chunk.parent.parent.parent.parent.name}/rel_mean/c/0/0"
    assert any(where in line and "is missing" in line for line in validate(str(store)).report())
    monkeypatch.setattr(results, "can_write", lambda folder: False)  # a read-only place: refused, naming the chunk
    with pytest.raises(DepthcacheError, match=f"cannot save results .*{where} is missing"):
        run("contributions", str(store))
    monkeypatch.undo()
    again = run("contributions", str(store))
    assert created(again) != created(first) and chunk.exists()  # recomputed, not served as NaN
    np.testing.assert_array_equal(again.rel_mean.values, first.rel_mean.values)
    assert validate(str(store)).count == 0


def test_results_of_fill_values_only_are_written_whole(tmp_path) -> None:
    ds = xr.Dataset({"nan": ("a", np.full(3, np.nan)), "zero": ("a", np.zeros(3, np.int32)), "scalar": ((), 0.0)})
    write_dataset_atomically(ds, tmp_path / "r")
    assert missing_chunks(zarr.open_group(str(tmp_path / "r"), mode="r")) == []
    (tmp_path / "r" / "scalar" / "c").unlink()
    assert missing_chunks(zarr.open_group(str(tmp_path / "r"), mode="r")) == ["scalar/c"]


def test_a_killed_writers_folder_is_invisible_and_removed_by_the_next_writer(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    first = run("residual-norms", str(store))
    folder = entry_folder(store, "residual-norms")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs: the writer killed with -9
    leftover = folder.with_name(f".{folder.name}.writing-{dead.pid}")
    folder.rename(leftover)  # complete-looking, but never published
    assert results.entries(results.places(Store(str(store)))[0]) == []
    assert "residual-norms" not in invoke("info", str(store)).output
    page = tmp_path / "r.html"
    assert invoke("report", str(store), "--out", str(page)).exit_code == 0
    assert 'id="analysis-residual-norms' not in page.read_text()
    again = run("residual-norms", str(store))
    assert created(again) != created(first) and not leftover.exists()
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]


def test_two_writers_of_one_result_never_fail(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "analyses" / "x" / "key"
    write_dataset_atomically(xr.Dataset({"v": ("a", np.zeros(3))}), folder)  # an older result, being replaced
    theirs = tmp_path / "theirs"
    write_dataset_atomically(xr.Dataset({"v": ("a", np.ones(3))}), theirs)
    real = io.replace_atomically

    def other_writer_first(staged: Path, dest: Path) -> None:  # the other process publishes in between
        shutil.copytree(theirs, dest)
        real(staged, dest)

    monkeypatch.setattr(io, "replace_atomically", other_writer_first)
    write_dataset_atomically(xr.Dataset({"v": ("a", np.full(3, 2.0))}), folder)
    # the result published first stays, whole
    assert xr.open_zarr(folder, consolidated=False).v.values.tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in folder.parent.iterdir()] == ["key"]  # no private folder left behind


def test_parameters_that_leave_no_token_are_refused_before_computing(base, tmp_path) -> None:
    store = fresh(base[0], tmp_path)
    for name in ("logit-lens", "effective-depth"):
        with pytest.raises(DepthcacheError, match=f"{name} with max_tokens=1 uses no token: .* pass -p "
                                                  "max_tokens=2 or more, or -p include_first=true"):
            run(name, str(store), max_tokens=1)
    assert not (store / "analyses").exists()  # nothing computed, nothing cached
    assert int(run("logit-lens", str(store), max_tokens=1, include_first=True).tokens_used) == 1
    assert int(run("logit-lens", str(store), max_tokens=2).tokens_used) == 1
    one = invoke("analyze", "logit-lens", str(store), "-p", "max_tokens=1")
    assert one.exit_code == 2 and one.output.startswith("error: logit-lens with max_tokens=1 uses no token")
    assert one.output.count("\n") == 1
