"""Stores of schema 1.x keep opening and analysing unchanged, and ``depthcache upgrade`` rewrites one as 2.0: the same
values, runs and provenance, sharded, validated, the source untouched; refusals in one line, nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_documents

import depthcache
from depthcache.analyze import run as analyze
from depthcache.cli import main
from depthcache.extraction import engine
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.skip_runs import SkipOptions, extract_skips


def options(out: Path, model: Path, data: Path) -> ExtractOptions:
    return ExtractOptions(out=str(out), model=str(model), data=str(data), dtype="bfloat16", seq_len=32,
                          batch_size=4, chunk_tokens=32, max_tokens=200, progress=False, device="cpu")


@pytest.fixture(scope="module")
def legacy(tiny_models, tmp_path_factory) -> Path:
    """A schema 1.3 store (all layers of 32 tokens in one chunk, no shards) with a skip run, as 0.2 wrote it."""
    folder = tmp_path_factory.mktemp("legacy")
    data = write_documents(folder / "docs.jsonl", [6] * 10)
    out = folder / "old.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "SCHEMA_VERSION", "1.3")
        patch.setattr(engine, "choose_token_shard_tokens", lambda *args: None)
        extract(options(out, tiny_models["llama"], data))
        extract_skips(options(out, tiny_models["llama"], data), SkipOptions("2", tokens=64))
    return out


def digest(folder: Path) -> str:
    """A hash of every file's path and bytes under ``folder``."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_a_1x_store_opens_and_analyses_unsharded(legacy: Path) -> None:
    meta = json.loads((legacy / "resid_pre" / "zarr.json").read_text())
    assert meta["codecs"][-1]["name"] == "crc32c" and meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 4
    ds = depthcache.open(legacy)
    assert ds.attrs["depthcache"]["schema_version"] == "1.3" and ds.resid_pre.shape[0] == 4
    assert np.isfinite(analyze("contributions", str(legacy)).rel_mean).all()
    assert "skip_2" in ds.attrs["runs"]


def test_upgrade_rewrites_every_value_and_run_as_2_0(legacy: Path, tmp_path: Path) -> None:
    before = digest(legacy)
    result = CliRunner().invoke(main, ["upgrade", str(legacy), str(tmp_path / "new.zarr"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert digest(legacy) == before  # the source is only read
    new = tmp_path / "new.zarr"
    meta = json.loads((new / "resid_pre" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    old_ds, new_ds = depthcache.open(legacy), depthcache.open(new)
    assert new_ds.attrs["depthcache"]["schema_version"] == depthcache.store.SCHEMA_VERSION
    assert new_ds.attrs["depthcache"]["created"] == old_ds.attrs["depthcache"]["created"]
    for name in old_ds.data_vars:
        np.testing.assert_array_equal(new_ds[name].values.view(np.uint8), old_ds[name].values.view(np.uint8))
    old_run, new_run = depthcache.open(legacy, run="skip_2"), depthcache.open(new, run="skip_2")
    for name in old_run.data_vars:
        np.testing.assert_array_equal(new_run[name].values, old_run[name].values)
    for name in ("contributions", "skip-effects"):  # the same values summed in other blocks: rounding apart
        xr_old, xr_new = analyze(name, str(legacy)), analyze(name, str(new))
        for var in xr_old.data_vars:
            np.testing.assert_allclose(xr_new[var].values, xr_old[var].values, rtol=1e-6, atol=1e-12)


def test_upgrade_refuses_in_one_line_and_writes_nothing(legacy: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    inside = runner.invoke(main, ["upgrade", str(legacy), str(legacy / "inner.zarr")])
    assert inside.exit_code == 2 and "overlaps the source" in inside.output and not (legacy / "inner.zarr").exists()
    (tmp_path / "taken.zarr").mkdir()
    taken = runner.invoke(main, ["upgrade", str(legacy), str(tmp_path / "taken.zarr")])
    assert taken.exit_code == 2 and "already exists" in taken.output
    first = tmp_path / "first.zarr"
    assert runner.invoke(main, ["upgrade", str(legacy), str(first), "--no-progress"]).exit_code == 0
    again = runner.invoke(main, ["upgrade", str(first), str(tmp_path / "again.zarr")])
    assert again.exit_code == 2 and "already sharded" in again.output
    damaged = tmp_path / "damaged.zarr"
    import shutil

    shutil.copytree(legacy, damaged)
    chunk = damaged / "mlp_out" / "c" / "0" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    bad = runner.invoke(main, ["upgrade", str(damaged), str(tmp_path / "out.zarr"), "--no-progress"])
    assert bad.exit_code == 2 and "mlp_out" in bad.output and "nothing was written" in bad.output, bad.output
    assert len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.zarr").exists() and not list(tmp_path.glob(".out.zarr.*"))
