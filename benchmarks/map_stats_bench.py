"""map-stats against its floors, interleaved (A B A B, medians and ranges):

1. the accumulation (``Moments.add`` on the host, ``DeviceMoments.add`` on a device) against a plain float32 GEMM of
   the same shapes on the same device: GFLOP/s of each and their ratio (goal ≥ 0.7);
2. with ``--shallow/--deep``: ``depthcache map-stats`` tokens/s against a plain forward of both models over the same
   windows (the floor), on ``--device`` (CPU, or CUDA when a GPU is lent).

    python benchmarks/map_stats_bench.py --d 896 --e 1536 --g 13 --t 15 --rows 4096 [--device cuda]
    python benchmarks/map_stats_bench.py --shallow qwen2.5-coder-0.5b --deep qwen2.5-coder-1.5b --tokens 4096 \
        --device cuda --layers 0,4,8,12,16,20,24 --deep-layers 0,4,8,12,16,20,24,28

Prints one JSON line per measurement (medians, ranges, ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from depthcache.extraction.map_stats import Accumulator, MapStatsOptions, load_pair, map_stats
from depthcache.store.map_stats import Moments


def timed(fn: Callable[[], None]) -> float:
    """Seconds one call takes (CUDA work synchronised)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(a: Callable[[], None], b: Callable[[], None], pairs: int) -> tuple[list[float], list[float]]:
    """Times of a and b run A B A B ... ``pairs`` times, after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(pairs):
        ta.append(timed(a))
        tb.append(timed(b))
    return ta, tb


def summary(name: str, times: list[float], work: float, unit: str) -> dict[str, object]:
    """Median rate with its range over the runs."""
    rates = sorted(work / t for t in times)
    return {"what": name, f"median_{unit}": round(statistics.median(rates), 2),
            f"range_{unit}": [round(rates[0], 2), round(rates[-1], 2)], "runs": len(times)}


def accumulation(args: argparse.Namespace) -> None:
    """Accumulating one product group against a GEMM of the same FLOPs and shapes."""
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.rows, args.g, args.d), dtype=np.float32)).to(device)
    y = torch.from_numpy(rng.standard_normal((args.rows, args.t, args.e), dtype=np.float32)).to(device)
    sums = Accumulator(Moments.zeros(args.g, args.d, args.t, args.e), None if args.device == "cpu" else device)
    flops = 2.0 * args.rows * args.g * args.d * (args.t * args.e + args.d)
    if args.device == "cpu":
        xn, yn = x.numpy(), y.numpy().reshape(args.rows, -1)
        gemm_x = np.ascontiguousarray(xn.reshape(args.rows, -1).T)

        def gemm() -> None:
            _ = gemm_x @ yn  # one (g·d × K) @ (K × t·e) product: what the sums need, with nothing around it
    else:
        gx, gy = x.reshape(args.rows, -1).T.contiguous(), y.reshape(args.rows, -1)

        def gemm() -> None:
            _ = gx @ gy
    gemm_flops = 2.0 * args.rows * args.g * args.d * args.t * args.e
    ta, tb = interleaved(lambda: sums.add(x, y), gemm, args.pairs)
    acc, floor = summary("accumulate", ta, flops / 1e9, "gflops"), summary("float32 GEMM", tb, gemm_flops / 1e9,
                                                                          "gflops")
    print(json.dumps({"device": args.device, "shapes": vars(args) | {}, "accumulate": acc, "gemm": floor,
                      "ratio_median": round(acc["median_gflops"] / floor["median_gflops"], 3)}, default=str))


def end_to_end(args: argparse.Namespace) -> None:
    """map-stats tokens/s against a plain forward of both models over the same windows."""
    folder = Path(tempfile.mkdtemp(prefix="mapstats-bench-"))
    base = dict(shallow=args.shallow, deep=args.deep, data=args.data, max_tokens=args.tokens, seq_len=args.seq_len,
                batch_size=args.batch_size, layers=args.layers, deep_layers=args.deep_layers, device=args.device,
                progress=False, test_tokens=args.tokens // 8, val_tokens=args.tokens // 16, curve_start=0)
    pair, _ = load_pair(MapStatsOptions(out=str(folder / "x"), **base), args.device)
    windows = pair.windows
    runs = iter(range(10**6))

    def stream() -> None:
        map_stats(MapStatsOptions(out=str(folder / f"run{next(runs)}"), **base))

    def forward() -> None:
        from depthcache.extraction.engine import batch_inputs

        with torch.inference_mode():
            for start in range(0, len(windows), args.batch_size):
                ids, mask = batch_inputs(windows[start:start + args.batch_size], args.seq_len, 0, args.device)
                pair.shallow.model(input_ids=ids, attention_mask=mask, use_cache=False)
                pair.deep.model(input_ids=ids, attention_mask=mask, use_cache=False)
    tokens = sum(len(w.tokens) for w in windows)
    ta, tb = interleaved(stream, forward, args.pairs)
    a, b = summary("map-stats", ta, tokens, "tok_per_s"), summary("plain forward of both", tb, tokens, "tok_per_s")
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps({"device": args.device, "tokens": tokens, "map_stats": a, "forward": b,
                      "slowdown_median": round(b["median_tok_per_s"] / a["median_tok_per_s"], 3),
                      "gpu_peak_gib": gpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--d", type=int, default=896)
    parser.add_argument("--e", type=int, default=1536)
    parser.add_argument("--g", type=int, default=13)
    parser.add_argument("--t", type=int, default=15)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--shallow")
    parser.add_argument("--deep")
    parser.add_argument("--data", default="pydoc-topics")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--deep-layers", default="all")
    args = parser.parse_args()
    if args.shallow and args.deep:
        end_to_end(args)
    else:
        accumulation(args)


if __name__ == "__main__":
    main()
