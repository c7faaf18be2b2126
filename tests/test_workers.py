"""Several extraction workers into one store give exactly the single-process store, even after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_resume import arrays, extract_cmd, write_many_docs

from depthcache.errors import DepthcacheError
from depthcache.extraction.workers import Worker, segments, worker_from_env


def test_shards_are_disjoint_and_cover_every_token() -> None:
    n, chunk, batch = 10_000, 64, 128
    owned = [segments(Worker(i, 3), n, chunk, batch, 0) for i in range(3)]
    tokens = sorted(t for ranges in owned for a, b in ranges for t in range(a, b))
    assert tokens == list(range(n))
    assert all(a % chunk == 0 for ranges in owned for a, _ in ranges)
    # progress trims only the worker's own finished part
    assert segments(Worker(1, 3), n, chunk, batch, owned[1][1][0] + chunk)[0][0] == owned[1][1][0] + chunk


def test_worker_from_environment() -> None:
    assert worker_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == Worker(2, 4)
    assert worker_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}) == Worker(1, 3)
    assert worker_from_env({}) == Worker(0, 1)
    with pytest.raises(DepthcacheError, match="worker-index"):
        Worker(3, 3)


def store_progress(store: Path) -> dict:
    """Root progress of a store (empty until it exists)."""
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]["progress"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def worker_committed(store: Path, index: int) -> int:
    """Tokens committed by one worker so far."""
    try:
        meta = json.loads((store / "progress" / f"worker_{index}" / "zarr.json").read_text())
        return meta["attributes"]["depthcache"]["tokens_committed_until"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_three_workers_with_a_kill_equal_one_process(tiny_models, tmp_path) -> None:
    data = write_many_docs(tmp_path / "many.jsonl")
    model = tiny_models["llama"]
    reference = tmp_path / "reference.zarr"
    subprocess.run(extract_cmd(model, data, reference), check=True, capture_output=True)

    shared = tmp_path / "shared.zarr"
    procs = [subprocess.Popen(extract_cmd(model, data, shared, "--num-workers", "3", "--worker-index", str(i)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(3)]
    deadline = time.monotonic() + 120
    while worker_committed(shared, 1) == 0 and procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = procs[1].poll() is None
    if killed:
        os.kill(procs[1].pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    assert killed, "worker 1 finished before it could be killed"
    assert not store_progress(shared)["complete"]
    finish = subprocess.run(extract_cmd(model, data, shared, "--num-workers", "3", "--worker-index", "1"),
                            capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert store_progress(shared)["complete"]
    ref, got = arrays(reference), arrays(shared)
    assert ref.keys() == got.keys()
    for name in ref:
        assert got[name] == ref[name], f"{name} differs between 3 workers and 1 process"
