"""Faults and bad input, one test per class: interrupts, the model head's checksums, decompression bombs, claimed
chunk counts, huge strings, absurd extract options, one-line errors, analysis parameter ranges and copy repair.
Every case gives the right result or one ``error:`` line saying what to do, and loses nothing."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from hostile import claim_chunks, edit_json, nested_json, plant_bomb, plant_bomb_in_shard, rle_frame
from test_extract import run
from test_resume import arrays

from depthcache.cli import main
from depthcache.errors import DepthcacheError, Interrupted
from depthcache.extraction import engine
from depthcache.store.head import load_tokenizer, read_head
from depthcache.store.schema import validate

GIB = 2**30


def cli(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    """Run a command in-process; any exception but a clean exit fails the test, and so does a traceback."""
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, list(args))
    finally:
        os.chdir(previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args[0]} crashed: {type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in result.output
    return result.exit_code, result.output


PROGRESS_LINE = re.compile(r"^[\w ./-]+: [\d,.]+/[\d,.]+ \w+ \(\d+%\), .*elapsed")  # what a long command logs


def one_error(code: int, out: str, *needles: str) -> None:
    """The command failed with exit status 2 and, besides progress lines, exactly one line, starting 'error: ' and
    naming ``needles``."""
    out = "".join(line for line in out.splitlines(keepends=True) if not PROGRESS_LINE.match(line))
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1, out
    for needle in needles:
        assert needle in out, out


@pytest.fixture(scope="module")
def store(tiny_models, text_file, tmp_path_factory) -> Path:
    """A small bf16 store (zstd-compressed activations) of schema 1.3."""
    return run(tmp_path_factory.mktemp("robust"), tiny_models["llama"], text_file, dtype="bfloat16", max_tokens=192)


@pytest.fixture
def copy(store, tmp_path) -> Path:
    """A fresh copy of the module's store to damage."""
    return Path(shutil.copytree(store, tmp_path / "copy.zarr"))


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` read-only for this process: file modes for a normal user, a read-only bind mount for root
    (who ignores file modes)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)]).returncode:
        if mounted:
            subprocess.run(["umount", str(folder)])
        pytest.skip("running as root without the right to bind-mount: no way to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# 1 ------------------------------------------------------------------------------------------------ interrupts

def test_interrupt_commits_whole_chunks_only_and_resume_is_bit_identical(tiny_models, text_file, tmp_path,
                                                                         monkeypatch) -> None:
    reference = run(tmp_path, tiny_models["llama"], text_file, name="reference.zarr")
    real = engine.planned_batches

    def interrupted_after(n: int):  # noqa: ANN202 - a planned_batches stand-in
        def batches(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            for i, item in enumerate(real(*args, **kw)):
                if i == n:
                    raise Interrupted(signal.SIGTERM)
                yield item
        return batches

    monkeypatch.setattr(engine, "planned_batches", interrupted_after(3))  # 3 batches of <= 96 tokens
    with pytest.raises(Interrupted) as caught:
        run(tmp_path, tiny_models["llama"], text_file, name="cut.zarr")
    progress = json.loads((tmp_path / "cut.zarr" / "zarr.json").read_text())["attributes"]["depthcache"]["progress"]
    total = json.loads((reference / "zarr.json").read_text())["attributes"]["depthcache"]["layout"]["n_tokens"]
    assert progress["tokens_committed"] % 64 == 0 and 0 < progress["tokens_committed"] < total  # whole chunks only
    message = str(caught.value)
    assert message.startswith(f"interrupted by SIGTERM; {tmp_path / 'cut.zarr'} keeps its "
                              f"{progress['tokens_committed']} committed tokens") and "--resume" in message
    monkeypatch.setattr(engine, "planned_batches", real)
    run(tmp_path, tiny_models["llama"], text_file, name="cut.zarr", resume=True)
    assert arrays(tmp_path / "cut.zarr") == arrays(reference)

    # a store an older version committed inside a chunk (tokens 0..99 of chunk 1) resumes from that chunk's start
    legacy = Path(shutil.copytree(reference, tmp_path / "legacy.zarr"))
    edit_json(legacy / "zarr.json", lambda m: m["attributes"]["depthcache"].update(
        progress={"tokens_committed": 100, "complete": False}))
    zarr.open_group(str(legacy), mode="r+")["resid_pre"][:, 64:] = 0  # what was never written
    run(tmp_path, tiny_models["llama"], text_file, name="legacy.zarr", resume=True)
    assert arrays(legacy) == arrays(reference)


def test_interrupt_from_the_command_line_is_one_error_line(tiny_models, text_file, tmp_path, monkeypatch) -> None:
    def interrupted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise Interrupted(signal.SIGINT)
        yield

    monkeypatch.setattr(engine, "planned_batches", interrupted)
    result = CliRunner().invoke(main, ["extract", "--model", str(tiny_models["llama"]), "--data", str(text_file),
                                       "--out", str(tmp_path / "s.zarr"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 130 and result.output.count("\n") == 1
    assert result.output.startswith("error: interrupted by SIGINT;") and "--resume" in result.output


def test_sighup_stops_an_extraction_like_sigterm() -> None:
    from depthcache.extraction.interrupts import raise_interrupted, stop_on_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal (nohup or a CI runner may ignore it,
    try:  # and an ignored signal stays ignored, by design)
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is raise_interrupted  # before: the default, which ends the process
            with pytest.raises(Interrupted) as caught:
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert caught.value.signum == signal.SIGHUP and str(caught.value) == "interrupted by SIGHUP"


def killed_write(path: Path) -> Path:
    """What kill -9 during zarr's write of ``path`` leaves: zarr's own temporary file (nothing renamed into place)."""
    from zarr.storage._local import _atomic_write

    before = set(path.parent.iterdir())
    with pytest.raises(KeyboardInterrupt), _atomic_write(path, "wb") as f:
        f.write(b"x" * 4096)
        raise KeyboardInterrupt  # not an Exception: zarr does not clean up, as after kill -9
    (leftover,) = set(path.parent.iterdir()) - before
    return leftover


def test_resume_removes_and_validate_reports_the_leftovers_of_a_killed_write(store, copy, tiny_models,
                                                                              text_file) -> None:
    chunk = next(p for p in (copy / "resid_pre" / "c").rglob("*") if p.is_file())  # c/0/1/0 style keys
    leftovers = [killed_write(chunk), killed_write(copy / "zarr.json")]
    assert leftovers[0].name.startswith(f"{chunk.name}.") and leftovers[0].name.endswith(".partial")
    found = validate(str(copy), read_chunks=False)
    assert found.count == 1 and "2 temporary file(s) of interrupted writes" in found.lines[0], found.report()
    assert str(leftovers[0].relative_to(copy)) in found.lines[0] and "--resume" in found.lines[0]
    code, out = cli("validate", str(copy))
    assert code == 2 and "is invalid:\n  2 temporary file(s) of interrupted writes" in out, out
    run(copy.parent, tiny_models["llama"], text_file, name=copy.name, dtype="bfloat16", max_tokens=192, resume=True)
    assert not any(p.exists() for p in leftovers) and validate(str(copy)).count == 0
    assert arrays(copy) == arrays(store)


def test_leftovers_in_a_live_writers_folder_are_not_ours() -> None:
    from depthcache.store.leftovers import leftover_keys

    uuid = "0123456789abcdef0123456789abcdef"
    keys = [f"resid_pre/c/0/3/0.{uuid}.partial", f"zarr.{uuid}.partial", "runs/skip_1/zarr.json.tmp",
            f"analyses/x/.k.writing-7/v/c/0.{uuid}.partial", "resid_pre/c/0/3/0", f"a.{uuid[:-1]}.partial"]
    assert leftover_keys(keys) == sorted(keys[:3])


# 2 ------------------------------------------------------------------------------------ model head checksums

def test_model_head_and_tokenizer_are_checksummed_and_validated(store, copy, tmp_path) -> None:
    for name in ("final_norm_weight", "unembed", "tokenizer/file_0"):
        meta = json.loads((copy / "model" / name / "zarr.json").read_text())
        assert meta["codecs"][-1]["name"] == "crc32c", name
    code, out = cli("validate", str(copy))
    assert code == 0 and "2 model head arrays (crc32c), 2 tokenizer files (sha256)" in out and "note:" not in out

    chunk = copy / "model" / "unembed" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the logit lens gave KL 3.9e8 from such a store, exit 0
    chunk.write_bytes(bytes(data))
    found = validate(str(copy))
    assert found.count == 1 and "model/unembed" in found.lines[0] and "model/unembed/c/0/0" in found.keys
    with pytest.raises(DepthcacheError, match="model/unembed is corrupt"):
        read_head(str(copy))
    code, out = cli("analyze", "logit-lens", str(copy), "--results", str(tmp_path / "r"))
    one_error(code, out, "model/unembed is corrupt")
    code, out = cli("pull", str(copy), str(tmp_path / "pulled.zarr"))
    one_error(code, out, "model/unembed is corrupt", "the source has the same problem")
    shutil.copy(store / "model" / "unembed" / "c" / "0" / "0", chunk)

    token_file = copy / "model" / "tokenizer" / "file_0" / "c" / "0"
    data = bytearray(token_file.read_bytes())
    data[-1] ^= 0x01  # the crc32c trailer itself
    token_file.write_bytes(bytes(data))
    with pytest.raises(DepthcacheError, match="tokenizer files are corrupt"):
        load_tokenizer(str(copy))
    assert "tokenizer files are corrupt" in validate(str(copy)).lines[0]
    shutil.copy(store / "model" / "tokenizer" / "file_0" / "c" / "0", token_file)

    chunk.unlink()  # a deleted chunk read as zeros and validated: now refused as soon as the store is opened
    code, out = cli("validate", str(copy), "--quick")
    assert code == 2 and "'model/unembed': 1 of 1 chunks are missing" in out
    code, out = cli("analyze", "residual-norms", str(copy), "--results", str(tmp_path / "r"))
    one_error(code, out, "is damaged", "model/unembed")


def test_a_schema_1_2_head_is_read_with_a_note(copy) -> None:
    edit_json(copy / "zarr.json", lambda m: m["attributes"]["depthcache"].update(schema_version="1.2"))
    for name in ("final_norm_weight", "unembed"):  # as schema 1.2 wrote them: no crc32c codec, no trailer
        edit_json(copy / "model" / name / "zarr.json", lambda m: m.update(codecs=m["codecs"][:-1]))
        for chunk in (copy / "model" / name / "c").rglob("*"):
            if chunk.is_file():
                chunk.write_bytes(chunk.read_bytes()[:-4])
    code, out = cli("validate", str(copy))
    assert code == 0 and "model head arrays (no checksum)" in out
    assert "note: model head not checksummed (schema < 1.3)" in out


# 3 ---------------------------------------------------------------------------------------- decompression bombs

BOMBS = [(2 * GIB, 2 * GIB), (2**20, 2**40), (2 * GIB, None), (2 * GIB, 100)]  # (expands to, declares)


@pytest.mark.parametrize("total, declared", BOMBS)
def test_zstd_bombs_are_refused_before_allocating(total, declared) -> None:
    import tracemalloc

    from depthcache.codecs import CorruptChunkError, bounded_decompress

    frame = np.frombuffer(rle_frame(total, declared), dtype=np.uint8)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunkError):
            bounded_decompress(frame, 512)  # a chunk of 128 int32
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # it allocated 2 GiB, or raised MemoryError for 1 TiB
    assert bytes(bounded_decompress(np.frombuffer(rle_frame(512, 512), dtype=np.uint8), 512)) == bytes([7]) * 512


@pytest.mark.parametrize("total, declared", BOMBS)
def test_bombs_in_a_store_are_one_error_line(store, copy, tmp_path, total, declared) -> None:
    for name, shard, n_inner in (("resid_pre", ("c", "0", "1", "0"), 4), ("position", ("c", "0"), 3)):
        path = copy.joinpath(name, *shard)  # schema 2.0: inner chunk 1 of a shard, its index pointing at the bomb
        plant_bomb_in_shard(path, 1, n_inner, total, declared)  # valid crc32c: only the readers' bounds stop it
        found = validate(str(copy))
        key = "/".join((name, *shard))
        assert found.count == 1 and name in found.lines[0] and key in found.keys, found.lines
        code, out = cli("analyze", "residual-norms", str(copy), "--results", str(tmp_path / "r"))
        one_error(code, out, name)
        shutil.copy(store.joinpath(name, *shard), path)
    plant_bomb(copy / "model" / "tokenizer" / "file_0" / "c" / "0", total, declared)
    with pytest.raises(DepthcacheError, match="tokenizer|damaged"):
        load_tokenizer(str(copy))


# 4 ------------------------------------------------------------------------------------- claimed chunk counts

def test_claimed_chunk_counts_cost_what_exists(copy) -> None:
    claim_chunks(copy, 2**20)  # consistent metadata, 2**20 committed chunks per array that do not exist
    started = time.monotonic()
    code, out = cli("validate", str(copy))
    assert code == 2 and len(out.splitlines()) <= 52 and "1,048,573 of 1,048,576 committed shards are missing" in out
    code, out = cli("info", str(copy))
    one_error(code, out, "is damaged", "committed shards are missing")
    assert time.monotonic() - started < 30  # it took 42 s (and 5.2 GB) for validate alone


# 5 ------------------------------------------------------------------------------------------ string lengths

def test_string_attributes_are_capped(copy, tmp_path) -> None:
    edit_json(copy / "zarr.json", lambda m: m["attributes"]["depthcache"]["model"].update(spec="x" * 10**6))
    for args in (("info", str(copy)), ("report", str(copy), "--out", str(tmp_path / "r.html")),
                 ("analyze", "residual-norms", str(copy), "--results", str(tmp_path / "r"))):
        code, out = cli(*args)
        assert code == 2 and "model.spec" in out and "is too long" in out and len(out) < 2000, out[:300]
    assert not (tmp_path / "r.html").exists()
    (copy / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "depthcache": {"pad": "x" * 17 * 2**20}}}))  # more than any store's metadata may take
    code, out = cli("info", str(copy))
    one_error(code, out, "more than the 16,777,216 a store's metadata may take")


# 6 ------------------------------------------------------------------------------------------ extract options

@pytest.mark.parametrize("option, message", [
    ({"top_k": 100000}, "--top-k 100000 exceeds the model's vocabulary of 384"),
    ({"seq_len": 10**9}, "--seq-len 1,000,000,000 exceeds the model's context of 256"),
    ({"chunk_tokens": 2**40}, "GiB (limit 1 GiB)"),
    ({"chunk_tokens": 2**22, "max_tokens": 256}, "would take 4.0 GiB (limit 1 GiB)"),
    ({"batch_size": 10**6}, "GiB of host memory"),
])
def test_absurd_extract_options_are_refused_before_anything_is_created(tiny_models, text_file, tmp_path, option,
                                                                       message) -> None:
    out = tmp_path / "new" / "deeper" / "s.zarr"
    with pytest.raises(DepthcacheError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(out.parent, tiny_models["llama"], text_file, **option)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


# 7 ------------------------------------------------------------------------------------------ one error line

def test_a_full_disk_while_creating_leaves_nothing(tiny_models, text_file, tmp_path, monkeypatch) -> None:
    real = zarr.storage.LocalStore.set

    async def full(self, key, value):  # noqa: ANN001, ANN202 - the store's own signature
        if key.startswith("model/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    with pytest.raises(DepthcacheError, match="cannot create .*No space left on device; nothing was left behind"):
        run(tmp_path / "a" / "b", tiny_models["llama"], text_file)
    assert list(tmp_path.iterdir()) == []


def test_read_only_places_are_one_error_line(store, tmp_path, tiny_models, text_file) -> None:
    ro = Path(shutil.copytree(store, tmp_path / "ro" / "s.zarr"))
    work = tmp_path / "work"
    work.mkdir()
    with read_only(ro.parent):
        with pytest.raises(DepthcacheError, match="cannot resume into .* is not writable"):
            run(ro.parent, tiny_models["llama"], text_file, dtype="bfloat16", max_tokens=192, resume=True)
        code, out = cli("analyze", "residual-norms", str(ro), cwd=work)  # results go to ./NAME.analyses/
        assert code == 0 and list((work / "s.zarr.analyses" / "residual-norms").glob("*/zarr.json"))
        code, out = cli("report", str(ro))
        one_error(code, out, "cannot write the report to", "pass --out FILE")
        with read_only(work):
            code, out = cli("analyze", "contributions", str(ro), cwd=work)
            one_error(code, out, "cannot save results", "pass --results FOLDER")


def test_nested_metadata_is_one_error_line(copy, tmp_path) -> None:
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["depthcache"]["model"]["config"]["deep"] = json.loads(nested_json(200))
    (copy / "zarr.json").write_text(json.dumps(meta))  # parses, but is deeper than any store's attributes
    calls = (("validate", str(copy)), ("info", str(copy)), ("report", str(copy), "--out", str(tmp_path / "r")),
             ("pull", str(copy), str(tmp_path / "pulled.zarr")))
    for args in calls:
        code, out = cli(*args)
        assert code == 2 and "nested more than 32 levels" in out, out
    (copy / "zarr.json").write_text(nested_json(100_000))  # 200 KB: deeper than Python's parser goes
    for args in calls:
        code, out = cli(*args)
        one_error(code, out)
    assert not (tmp_path / "pulled.zarr").exists() and not (tmp_path / "r").exists()


def test_junk_results_and_bad_inputs_are_one_error_line(copy, tmp_path, tiny_models) -> None:
    import xarray as xr

    from depthcache.store.io import checksummed_encoding
    from depthcache.store.results import RESULT_ATTR

    code, out = cli("analyze", "contributions", str(copy))
    assert code == 0
    entry = next(p for p in (copy / "analyses" / "contributions").iterdir() if p.is_dir())
    provenance = json.loads((entry / "zarr.json").read_text())["attributes"][RESULT_ATTR]  # forged below
    junk = xr.Dataset({"x": ("a", np.arange(3.0))}, attrs={RESULT_ATTR: provenance})
    for encoding, message in ((checksummed_encoding(junk), "is not a contributions result this version can draw"),
                              (None, "unreadable, implausibly large, not checksummed or corrupt")):
        shutil.rmtree(entry)
        junk.to_zarr(entry, zarr_format=3, consolidated=False, encoding=encoding)
        code, out = cli("report", str(copy), "--out", str(tmp_path / "r.html"))
        one_error(code, out, "cached analysis 'contributions'", message, "--force")
        code, out = cli("analyze", "contributions", str(copy))  # exit 0 (recomputed) or one line, never a traceback
        assert code == 0 or out.startswith("error: ") and out.count("\n") == 1, out
    assert validate(str(copy)).count == 0  # recomputed: the junk was never taken for a result
    code, out = cli("report", str(copy), "--out", str(tmp_path / "r.html"))
    assert code == 0 and (tmp_path / "r.html").exists()

    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    for data, message in ((latin, "is not UTF-8 text (byte 0xe9 at offset 3)"), (binary, "is not a text file")):
        code, out = cli("extract", "--model", str(tiny_models["llama"]), "--data", str(data), "--out",
                        str(tmp_path / "x.zarr"), "--device", "cpu")
        one_error(code, out, message)
    (tmp_path / "afile").write_text("not a folder")
    code, out = cli("analyze", "residual-norms", str(copy), "--results", str(tmp_path / "afile"))
    one_error(code, out, "cannot save results", "is in the way")


def test_symlink_loops_are_one_error_line(store, tmp_path, tiny_models, text_file, monkeypatch) -> None:
    loop = tmp_path / "loop.zarr"
    loop.symlink_to(loop)

    def no_model(*args, **kw):  # noqa: ANN002, ANN003, ANN202 - refused before the model is loaded
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine, "load_fitted", no_model)
    for args in (("validate", loop), ("info", loop), ("analyze", "residual-norms", loop),
                 ("plot", "contributions", loop), ("report", loop, "--out", tmp_path / "r.html"),
                 ("pull", loop, tmp_path / "p.zarr"), ("pull", store, loop), ("analyze", "residual-norms", store, "--results", loop),
                 ("extract", "--model", tiny_models["llama"], "--data", text_file, "--out", loop, "--device", "cpu")):
        code, out = cli(*map(str, args))
        one_error(code, out, str(loop))
        assert "symbolic links" in out or "Symlink loop" in out or "no depthcache store" in out, out


def test_corrupt_chunks_read_through_the_python_api_are_named(copy) -> None:
    import depthcache
    from depthcache.errors import CorruptData

    chunk = copy / "resid_pre" / "c" / "0" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match=r"corrupt data: .*copy.zarr: array 'resid_pre' token chunk 1 \(tokens "
                                          r"64\.\.127\): .*depthcache validate STORE"):
        depthcache.open(copy).resid_pre.values
    code, out = cli("analyze", "residual-norms", str(copy), "--results", str(copy.parent / "r"))
    one_error(code, out, "array 'resid_pre' token chunk 1 (tokens 64..127)")


# 8 ----------------------------------------------------------------------------------- analysis parameters

@pytest.mark.parametrize("param", ["max_tokens=-5", "max_tokens=0", "max_tokens=NaN"])
def test_analysis_parameters_out_of_range_are_refused_and_nothing_cached(copy, tmp_path, param) -> None:
    code, out = cli("analyze", "logit-lens", str(copy), "-p", param, "--results", str(tmp_path / "r"))
    one_error(code, out, "must be of type int | None, ", "at least 1")
    assert not (tmp_path / "r").exists()


# 9 ------------------------------------------------------------------------------------------- copy repair

def test_pull_repairs_a_damaged_copy_and_ignores_stray_keys(store, tmp_path, monkeypatch) -> None:
    source = Path(shutil.copytree(store, tmp_path / "src.zarr"))
    dest = tmp_path / "dst.zarr"
    code, out = cli("pull", str(source), str(dest))
    assert code == 0 and "model head arrays (crc32c)" in out and "tokenizer files (sha256)" in out
    chunk = dest / "resid_pre" / "c" / "0" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same crc trailer: skipped by every later pull before
    chunk.write_bytes(bytes(data))
    code, out = cli("pull", str(source), str(dest))
    assert code == 0 and "1 damaged at the destination fetched again" in out, out
    assert chunk.read_bytes() == (source / "resid_pre" / "c" / "0" / "1" / "0").read_bytes()

    src_chunk = source / "token_id" / "c" / "0"  # schema 2.0: the token arrays of 192 tokens are one shard
    data = bytearray(src_chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    src_chunk.write_bytes(bytes(data))  # damaged at the source: say so, not 'run the same command again' forever
    code, out = cli("pull", str(source), str(tmp_path / "fresh.zarr"))
    one_error(code, out, "token_id", "the source has the same problem")

    from depthcache import sharing

    listed = {"zarr.json": 10, "/stray": 3, "a//b": 1, "../../outside": 2, "x/./y": 1, "ok/c/0": 5, "t\\u": 1}
    monkeypatch.setattr(sharing, "listing", lambda where: listed)  # keys no store may hold, from object storage
    objects, ignored = sharing.source_objects(sharing.Place(None, "root"), "src")
    assert set(objects) == {"zarr.json", "ok/c/0"} and set(ignored) == {"/stray", "a//b", "t\\u"}


# bounded memory ---------------------------------------------------------------------------------------------

CHILD = """
import json, resource, sys
from click.testing import CliRunner
from depthcache.cli import main

def invoke(args):
    result = CliRunner().invoke(main, args)
    crash = None if result.exception is None or isinstance(result.exception, SystemExit) else result.exception
    return [result.exit_code, result.output[:400], repr(crash)[:400] if crash is not None else None]

clean, hostile = json.loads(sys.argv[1])
out = {"clean": [invoke(args) for args in clean]}
peak = int(open("/proc/self/status").read().split("VmPeak:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (peak + 2**30, peak + 2**30))  # 1 GiB above what the clean run needed
out["hostile"] = {label: invoke(args) for label, args in hostile}
print(json.dumps(out))
"""


def test_hostile_stores_run_in_bounded_memory(store, tmp_path) -> None:
    def hostile_copy(label: str) -> Path:
        return Path(shutil.copytree(store, tmp_path / f"{label}.zarr"))

    stores = {label: hostile_copy(label) for label in ("bomb", "tebibyte", "undeclared", "claimed", "spec", "big",
                                                        "nested")}
    plant_bomb(stores["bomb"] / "resid_pre" / "c" / "0" / "1" / "0", 2 * GIB, 2 * GIB)
    plant_bomb(stores["tebibyte"] / "resid_pre" / "c" / "0" / "1" / "0", 2**20, 2**40)
    plant_bomb(stores["undeclared"] / "resid_pre" / "c" / "0" / "1" / "0", 2 * GIB, None)
    claim_chunks(stores["claimed"], 2**20)
    edit_json(stores["spec"] / "zarr.json", lambda m: m["attributes"]["depthcache"]["model"].update(
        spec="x" * 4 * 2**20))
    (stores["big"] / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "depthcache": {"pad": ["x" * 1000] * 40_000}}}))
    (stores["nested"] / "zarr.json").write_text(nested_json(100_000))
    results = str(tmp_path / "results")
    clean = [["validate", str(store)], ["analyze", "residual-norms", str(store), "--results", results],
             ["report", str(store), "--out", str(tmp_path / "clean.html")],
             ["pull", str(store), str(tmp_path / "clean-copy.zarr")]]
    commands = {"validate": lambda label: ["validate", str(stores[label])],
                "info": lambda label: ["info", str(stores[label])],
                "analyze": lambda label: ["analyze", "residual-norms", str(stores[label]), "--results",
                                          f"{results}-{label}"],
                "report": lambda label: ["report", str(stores[label]), "--out", str(tmp_path / f"{label}.html")],
                "pull": lambda label: ["pull", str(stores[label]), str(tmp_path / f"{label}-copy.zarr")]}
    reading = {"bomb": "validate analyze pull", "tebibyte": "validate analyze pull", "undeclared": "validate analyze",
               "claimed": "validate info analyze", "spec": "info report analyze", "big": "info validate",
               "nested": "validate info report pull"}  # the commands that read what each case damages
    hostile = [(f"{label} {command}", commands[command](label)) for label in stores
               for command in reading[label].split()]
    env = os.environ | {"MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps([clean, hostile])], capture_output=True,
                           text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert all(code == 0 and crash is None for code, _, crash in out["clean"]), out["clean"]
    for label, (code, text, crash) in out["hostile"].items():
        text = "".join(line for line in text.splitlines(keepends=True) if not PROGRESS_LINE.match(line))
        assert crash is None and code == 2 and text.startswith("error: "), f"{label}: {code} {crash} {text}"


def test_documented_limits_are_the_enforced_ones() -> None:
    from depthcache.limits import LIMITS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "store-format.md").read_text(encoding="utf-8")
    documented = {name: int(value) for name, value in re.findall(r"^\| `(max_\w+)` \| (\d+) \|", doc, re.M)}
    assert documented == LIMITS
