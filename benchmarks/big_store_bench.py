"""A store larger than the machine's memory, read by every command that reads it (benchmarks/README.md, "A store
larger than memory").

Before each step every file of the store is dropped from the page cache (``posix_fadvise(DONTNEED)``; the store is
larger than memory anyway), then the step runs in its own process under ``benchmarks/measured.py`` (wall time, peak
RSS, bytes read, dask tasks and the time to the first task). The disk's sequential read bandwidth is measured first
and last on a file larger than memory (written here, then removed). Results go to OUT.jsonl, one line per step.

    python benchmarks/big_store_bench.py STORE OUT.jsonl [--steps bandwidth,validate,...] [--s3 http://127.0.0.1:4568]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30
PIECE = 64 * 2**20

ONE_LAYER = """
import sys, numpy as np
from depthcache.torch import ActivationDataset
rows = 0
for batch in ActivationDataset(sys.argv[1], site="resid_pre", layers=[3], batch_size=4096):
    rows += len(batch["activations"])
print(rows, "rows of layer 3")
"""
ALL_LAYERS = ONE_LAYER.replace("layers=[3]", "layers=None").replace("of layer 3", "of all layers")
CLUSTER = """
import sys, json, numpy as np
from distributed import LocalCluster
from depthcache.analyze import run
if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = run(sys.argv[2], sys.argv[1], force=True, results_dir=sys.argv[3],
                     scheduler_address=cluster.scheduler_address)
    result.to_netcdf(sys.argv[4])
"""
THREADED = """
import sys
from depthcache.analyze import run
result = run(sys.argv[2], sys.argv[1], force=True, results_dir=sys.argv[3])
result.to_netcdf(sys.argv[4])
"""


def drop_cache(paths: list[Path]) -> None:
    """Evict every file under ``paths`` from the page cache (clean pages; the store is only read here)."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bandwidth(folder: Path, size: int, out: Path, label: str) -> None:
    """Sequential read bandwidth of a new file of ``size`` bytes (written with fsync, dropped, read in 64 MiB)."""
    path = folder / "bandwidth.bin"
    block = os.urandom(PIECE)
    with open(path, "wb") as f:
        for _ in range(size // PIECE):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    drop_cache([path])
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(PIECE):
            pass
    wall = time.perf_counter() - started
    path.unlink()
    record = {"label": label, "wall_s": round(wall, 2), "read_bytes": size,
              "mib_per_s": round(size / 2**20 / wall, 1)}
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr)


def raw_read(paths: list[Path], out: Path, label: str) -> None:
    """The floor of reading these files: each read whole, sequentially, in 64 MiB pieces, after dropping them."""
    drop_cache(paths)
    files = [p for root in paths for p in sorted(root.rglob("*")) if p.is_file()]
    started, total = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while data := f.read(PIECE):
                total += len(data)
    wall = time.perf_counter() - started
    record = {"label": label, "wall_s": round(wall, 2), "read_bytes": total, "mib_per_s": round(total / 2**20 / wall, 1)}
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr)


def measured(out: Path, label: str, *command: str, store: Path | None = None, env: dict | None = None) -> None:
    """One step in its own process, the store dropped from the page cache first."""
    if store is not None:
        drop_cache([store])
    subprocess.run([sys.executable, str(HERE / "measured.py"), str(out), label, *command], check=False,
                   env={**os.environ, **(env or {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", default="bandwidth,raw,validate,contributions,residual-norms,one-layer,all-layers,"
                                           "layer-map,cluster,bandwidth")
    parser.add_argument("--s3", default=None, help="endpoint of a local S3 server for push and pull")
    parser.add_argument("--work", type=Path, default=Path("runs/big-bench"))
    args = parser.parse_args()
    store, out, work = args.store.resolve(), args.out.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results = str(work / "results")
    for step in args.steps.split(","):
        if step == "bandwidth":
            bandwidth(work, (ram + 4 * GIB) // PIECE * PIECE, out, "disk read bandwidth (file > RAM)")
        elif step == "raw":
            raw_read([store / "resid_pre", store / "attn_out", store / "mlp_out"], out, "raw read of the layered arrays")
        elif step == "validate":
            measured(out, "validate", "depthcache", "validate", str(store), store=store)
        elif step in ("contributions", "residual-norms"):
            measured(out, f"analyze {step}", "depthcache", "analyze", step, str(store), "--force", "--results",
                     results, store=store)
        elif step == "contributions-4-threads":  # dask's threaded scheduler with 4 threads on 2 cores
            measured(out, "analyze contributions, 4 dask threads", "depthcache", "analyze", "contributions",
                     str(store), "--force", "--results", results, store=store, env={"DASK_NUM_WORKERS": "4"})
        elif step == "one-layer":
            measured(out, "ActivationDataset one layer", "python", "-c", ONE_LAYER, str(store), store=store)
        elif step == "all-layers":
            measured(out, "ActivationDataset all layers", "python", "-c", ALL_LAYERS, str(store), store=store)
        elif step == "layer-map":
            measured(out, "layer-map self pair, 3 x 3 layers", "depthcache", "analyze", "layer-map", str(store),
                     str(store), "--force", "--results", results, "-p", "shallow_layers=0,10,20", "-p",
                     "deep_layers=5,15,30", store=store)
        elif step == "cluster":
            for name in ("contributions", "residual-norms"):
                for how, code in (("threaded", THREADED), ("LocalCluster 2x1", CLUSTER)):
                    measured(out, f"{name} {how}", "python", "-c", code, str(store), name, results,
                             str(work / f"{name}-{how.split()[0]}.nc"), store=store)
        elif step == "push" and args.s3:
            option = f"endpoint_url={args.s3}"
            measured(out, "push to local S3", "depthcache", "push", str(store), "s3://bench/big.zarr",
                     "--storage-option", option, "--no-progress", store=store)
        elif step == "pull" and args.s3:
            measured(out, "pull from local S3", "depthcache", "pull", "s3://bench/big.zarr", str(store),
                     "--storage-option", f"endpoint_url={args.s3}", "--no-progress")
        else:
            raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main()
