"""push/pull throughput against a loopback S3 server (moto), as ratios to a plain local copy measured in the same run.

Usage: .venv/bin/python benchmarks/sharing_bench.py runs/smollm2-15L.zarr
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import depthcache  # noqa: F401 - registers bfloat16
from depthcache.sharing import copy_store, listing, place
from depthcache.store.schema import validate_store


def timed(label: str, fn, size: int, baseline: float | None) -> float:  # noqa: ANN001 - any callable
    """Run ``fn`` once and print seconds, MB/s and the ratio to the baseline."""
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    ratio = f"{seconds / baseline:6.2f}×" if baseline else "  1.00×"
    print(f"| {label:<38} | {seconds:7.2f} | {size / seconds / 2**20:7.1f} | {ratio} |", flush=True)
    return seconds


def main(store: str) -> None:
    """Local copy (baseline), push with 1 and 16 jobs, resumed push, remote validate, pull."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    place("s3://bench").fs.mkdir("bench")
    size = sum(listing(place(store)).values())
    objects = len(listing(place(store)))
    print(f"store {store}: {size / 2**20:.1f} MiB in {objects} objects; load average before {os.getloadavg()[0]:.2f}")
    print("| step | seconds | MiB/s | vs local copy |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base = timed("local copy (shutil.copytree)", lambda: shutil.copytree(store, Path(tmp) / "c.zarr"), size, None)
        timed("push, 1 job (+ verify)", lambda: copy_store(store, "s3://bench/one.zarr", jobs=1), size, base)
        timed("push, 16 jobs (+ verify)", lambda: copy_store(store, "s3://bench/a.zarr", jobs=16), size, base)
        timed("push again: all skipped (+ verify)", lambda: copy_store(store, "s3://bench/a.zarr"), size, base)
        timed("validate on s3 (every chunk)", lambda: validate_store("s3://bench/a.zarr"), size, base)
        timed("pull, 16 jobs (+ verify)", lambda: copy_store("s3://bench/a.zarr", str(Path(tmp) / "p.zarr")),
              size, base)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1])
