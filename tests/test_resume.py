"""kill -9 in the middle of an extraction, then --resume: the store equals an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from conftest import write_documents


def extract_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The CLI command line of a small but many-chunk (and many-shard) extraction."""
    return [sys.executable, "-m", "depthcache.cli", "extract", "--model", str(model), "--data", str(data),
            "--out", str(out), "--seq-len", "32", "--batch-size", "4", "--chunk-tokens", "32", "--max-tokens", "0",
            "--token-shard-tokens", "64",  # 2.0: token arrays in shards of two chunks, each written in two parts
            "--device", "cpu", "--no-progress", *extra]


def committed(store: Path) -> int:
    """Tokens the store says are committed (0 while it does not exist yet)."""
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]["progress"]["tokens_committed"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def arrays(store: Path) -> dict[str, bytes]:
    """Raw bytes of every array (NaNs compare equal this way)."""
    root = zarr.open_group(str(store), mode="r")
    return {name: np.ascontiguousarray(a[...]).tobytes() for name, a in root.arrays()}


def write_many_docs(path: Path) -> Path:
    """A JSONL dataset of 48 documents, enough for ~180 chunks of 32 tokens."""
    write_documents(path, [8] * 48)
    return path


def test_kill_and_resume_is_bit_identical(tiny_models, tmp_path) -> None:
    data = write_many_docs(tmp_path / "many.jsonl")
    model = tiny_models["llama"]
    reference = tmp_path / "reference.zarr"
    subprocess.run(extract_cmd(model, data, reference), check=True, capture_output=True)
    total = json.loads((reference / "zarr.json").read_text())["attributes"]["depthcache"]["layout"]["n_tokens"]

    killed = tmp_path / "killed.zarr"
    kills = 0
    for _ in range(3):  # kill at a few different moments, resuming each time
        proc = subprocess.Popen(extract_cmd(model, data, killed, "--resume"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start = committed(killed)
        deadline = time.monotonic() + 120
        while committed(killed) <= start + 64 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert committed(killed) % 32 == 0 or committed(killed) == total
    assert kills >= 1, "the extraction finished before it could be killed"
    assert committed(killed) < total
    subprocess.run(extract_cmd(model, data, killed, "--resume"), check=True, capture_output=True)
    assert committed(killed) == total
    ref, got = arrays(reference), arrays(killed)
    assert ref.keys() == got.keys()
    for name in ref:
        assert got[name] == ref[name], f"{name} differs after kill and resume"
