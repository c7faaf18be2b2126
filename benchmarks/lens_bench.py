"""Logit-lens throughput against the machine's float32 GEMM, interleaved in one run.

    python benchmarks/lens_bench.py [STORE] [--tokens 1024] [--pairs 3]

The lens's useful work is one (tokens × d_model) @ (d_model × vocab) product per stored layer plus one for the final
residual; its GFLOP/s count only those products. The reference is numpy's float32 matmul of the same shape (all BLAS
threads, best of 3 inside each turn). Runs alternate lens, GEMM, lens, GEMM, ... for ``--pairs`` pairs; the ratio is
taken pair by pair and reported as median and range with the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def lens_seconds(store: str, tokens: int) -> tuple[float, int]:
    """Seconds of one forced logit-lens run over the first ``tokens`` tokens, and the tokens it used."""
    from depthcache.analyze import run

    start = time.perf_counter()
    result = run("logit-lens", store, force=True, max_tokens=tokens)
    return time.perf_counter() - start, int(result.tokens_used)


def gemm_gflops(rows: int, d_model: int, vocab: int) -> float:
    """Best of 3 float32 (rows × d_model) @ (d_model × vocab) products, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, d_model), dtype=np.float32)
    b = rng.standard_normal((vocab, d_model), dtype=np.float32)
    best = np.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - start)
    return 2 * rows * d_model * vocab / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", default=str(REPO / "runs" / "extract-bench" / "depthcache-bfloat16.zarr"))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    import depthcache

    ds = depthcache.open(args.store)
    layers, d_model = ds.sizes["layer"], ds.sizes["d_model"]
    vocab = int(ds.attrs["depthcache"]["model"]["vocab_size"])
    load_before = os.getloadavg()
    lens, gemm = [], []
    for _ in range(args.pairs):
        seconds, used = lens_seconds(args.store, args.tokens)
        lens.append(2 * (layers + 1) * d_model * vocab * used / seconds / 1e9)
        gemm.append(gemm_gflops(1024, d_model, vocab))
        print(f"  lens {lens[-1]:6.1f} GFLOP/s ({seconds:.1f} s, {used} tokens)   GEMM {gemm[-1]:6.1f} GFLOP/s",
              flush=True)
    load_after = os.getloadavg()
    ratios = [x / y for x, y in zip(lens, gemm)]

    def fmt(v: list[float], digits: int = 1) -> str:
        return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"

    print(f"| logit lens ({layers} layers + final, d_model {d_model}, vocab {vocab:,}, {args.tokens} tokens) | "
          f"{fmt(lens)} GFLOP/s | GEMM {fmt(gemm)} GFLOP/s | **{fmt(ratios, 2)}** | load {load_before[0]:.1f} → "
          f"{load_after[0]:.1f} |")


if __name__ == "__main__":
    main()
