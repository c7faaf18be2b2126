"""layer-map benchmark: all layer pairs of two synthetic 31-boundary stores against scikit-learn's Ridge.

Writes two synthetic activation arrays laid out like a depthcache store's residual stream (Zarr v3, bfloat16,
zstd + crc32c, chunks of all layers × 1024 tokens): a 30-layer "shallow" and a 30-layer "deep" model, both with
31 boundaries, ``--tokens`` tokens and width ``--d``; layer activations are a smooth function of depth applied to a
shared latent, plus noise, so the maps have real structure. Then, in one run:
- the out-of-core layer-map fit (``fit_all``: accumulation pass, eigen-solves, test pass) in a child process, whose
  peak RSS is read with getrusage(RUSAGE_CHILDREN);
- the accumulation's GFLOP/s against a plain float32 matrix product of the same shape, timed here;
- the baseline: scikit-learn ``Ridge(alpha, fit_intercept=True)`` per pair on in-memory float32 arrays, every
  candidate penalty fitted and scored on the validation split, the best one refitted; timed on ``--sample-pairs``
  pairs and extrapolated to all pairs; its test R² and mean ‖ŷ−y‖/‖y‖ are compared with the analysis's.

    python benchmarks/layermap_bench.py [--tokens 102400] [--d 256] [--dir /tmp/layermap-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

import depthcache  # noqa: F401 - registers the bfloat16 zarr data type
from depthcache.analyze import layer_map as lm
from depthcache.dtypes import STORED_DTYPES
from depthcache.store.layout import compressors

SEQ_LEN = 128
CHUNK = 1024
LATENT = 64


def layer_matrix(depth: float, bases: np.ndarray) -> np.ndarray:
    """The (LATENT, d) read-out at relative ``depth``: a smooth blend of a few random bases."""
    weights = np.exp(-((depth - np.linspace(0, 1, len(bases))) ** 2) / 0.02)
    return np.tensordot(weights / weights.sum(), bases, axes=1)


def write_store(path: Path, n: int, d: int, layers: int, seed: int) -> None:
    """A bf16 (boundary, token, d) array 'resid': read-outs of a latent shared by both stores, own noise (seed)."""
    rng = np.random.default_rng(seed)
    bases = np.random.default_rng(7).standard_normal((5, LATENT, d)).astype(np.float32)
    mats = np.stack([layer_matrix(b / layers, bases) for b in range(layers + 1)])
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array("resid", shape=(layers + 1, n, d), chunks=(layers + 1, CHUNK, d),
                             dtype=STORED_DTYPES["bfloat16"], compressors=compressors("bfloat16"), fill_value=0)
    latent_rng = np.random.default_rng(0)
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        z = latent_rng.standard_normal((k, LATENT), dtype=np.float32)
        z = np.tanh(z) + 0.3 * z**2  # nonlinear in the latent: maps between depths are not exact
        h = np.einsum("kl,bld->bkd", z, mats) + 0.2 * rng.standard_normal((layers + 1, k, d), dtype=np.float32)
        arr[:, start:start + k] = (h + 3.0).astype(STORED_DTYPES["bfloat16"])


def splits(n: int) -> np.ndarray:
    """The analysis's split over windows of SEQ_LEN tokens (position 0 left out)."""
    return lm.split_tokens(np.arange(n) // SEQ_LEN, np.arange(n) % SEQ_LEN, 0.15, 0.15, include_first=False)


def fit_child(folder: Path, memory_gib: float) -> None:
    """Child process: the out-of-core fit of every pair, results and timings saved as npz/json."""
    x = da.from_zarr(zarr.open_array(str(folder / "shallow.zarr"), path="resid", mode="r"))
    y = da.from_zarr(zarr.open_array(str(folder / "deep.zarr"), path="resid", mode="r"))
    grid = np.asarray(lm.DEFAULT_GRID)
    clock = time.perf_counter()
    out = lm.fit_all(x, y, splits(x.shape[1]), grid, "source", np.dtype("float32"), memory_gib)
    total = time.perf_counter() - clock
    np.savez(folder / "fit.npz", r2=out.r2, rel_error=out.rel_error, penalty=out.penalty,
             candidates=out.candidates, val_r2=out.val_r2)
    (folder / "fit.json").write_text(json.dumps({"total_s": total, "flops": out.flops, "seconds": out.seconds,
                                                 "group": out.group, "rows": out.rows, "passes": out.passes}))


def matmul_gflops(rows: int, left: int, right: int, repeats: int = 3) -> float:
    """GFLOP/s of a plain float32 product (rows × left)ᵀ @ (rows × right), best of ``repeats``."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((rows, left), dtype=np.float32)
    b = rng.standard_normal((rows, right), dtype=np.float32)
    best = np.inf
    for _ in range(repeats):
        clock = time.perf_counter()
        a.T @ b
        best = min(best, time.perf_counter() - clock)
    return 2 * rows * left * right / best / 1e9


def sklearn_pair(x: np.ndarray, y: np.ndarray, split: np.ndarray, penalties: np.ndarray) -> tuple[float, ...]:
    """The baseline for one pair: fit and score every penalty on validation, refit the best; (R², rel, seconds)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    train, val, test = (split == s for s in (lm.TRAIN, lm.VAL, lm.TEST))
    clock = time.perf_counter()
    xt, yt = x[train], y[train]
    scores = [r2_score(y[val], Ridge(alpha=a).fit(xt, yt).predict(x[val]), multioutput="variance_weighted")
              for a in penalties]
    model = Ridge(alpha=penalties[int(np.argmax(scores))]).fit(xt, yt)
    seconds = time.perf_counter() - clock
    pred = model.predict(x[test])
    r2 = r2_score(y[test], pred, multioutput="variance_weighted")
    rel = np.mean(np.linalg.norm(pred - y[test], axis=1) / np.linalg.norm(y[test], axis=1))
    return float(r2), float(rel), seconds, int(np.argmax(scores))


def main() -> None:
    """Make the stores, run the fit in a child, time the baseline on a sample of pairs, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=102_400)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--sample-pairs", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=4.0)
    parser.add_argument("--dir", default="/tmp/layermap-bench")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.dir)
    if args.child:
        fit_child(folder, args.memory_gib)
        return
    load_before = os.getloadavg()[0]
    folder.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    for name, seed in (("shallow", 1), ("deep", 2)):
        if not (folder / f"{name}.zarr" / "zarr.json").exists():
            write_store(folder / f"{name}.zarr", args.tokens, args.d, args.layers, seed)
    print(f"stores: {time.perf_counter() - clock:.0f} s to write 2 × {args.layers + 1} boundaries × {args.tokens:,} "
          f"tokens × d {args.d} (bf16)")
    subprocess.run([sys.executable, __file__, "--child", "--dir", str(folder), "--memory-gib", str(args.memory_gib)],
                   check=True)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    fit = json.loads((folder / "fit.json").read_text())
    res = np.load(folder / "fit.npz")
    b, d = args.layers + 1, args.d
    gemm = matmul_gflops(fit["rows"], fit["group"] * d, b * d)
    acc = fit["flops"] / fit["seconds"]["accumulate"] / 1e9
    x = zarr.open_array(str(folder / "shallow.zarr"), path="resid", mode="r")
    y = zarr.open_array(str(folder / "deep.zarr"), path="resid", mode="r")
    split = splits(args.tokens)
    rng = np.random.default_rng(3)
    pairs = [(int(i), int(j)) for i, j in rng.integers(0, b, size=(args.sample_pairs, 2))]
    worst, base_seconds = 0.0, []
    for i, j in pairs:
        r2, rel, seconds, chosen = sklearn_pair(x[i].astype(np.float32), y[j].astype(np.float32), split,
                                                res["candidates"][i])
        base_seconds.append(seconds)
        worst = max(worst, abs(r2 - res["r2"][i, j]), abs(rel - res["rel_error"][i, j]) / rel)
        print(f"pair ({i}, {j}): sklearn R² {r2:.6f} rel {rel:.6f} | layer-map R² {res['r2'][i, j]:.6f} "
              f"rel {res['rel_error'][i, j]:.6f} | {seconds:.1f} s")
    baseline_all = np.mean(base_seconds) * b * b
    load_after = os.getloadavg()[0]
    print(json.dumps({"tokens": args.tokens, "d": d, "boundaries": b, "pairs": b * b, "grid": len(lm.DEFAULT_GRID),
                      "layer_map_s": round(fit["total_s"], 1), "phases_s": {k: round(v, 1) for k, v in
                                                                            fit["seconds"].items()},
                      "passes": fit["passes"], "block_rows": fit["rows"],
                      "sklearn_per_pair_s": round(float(np.mean(base_seconds)), 2),
                      "sklearn_all_pairs_extrapolated_s": round(baseline_all),
                      "speedup": round(baseline_all / fit["total_s"], 1),
                      "accumulate_gflops": round(acc, 1), "plain_f32_gemm_gflops": round(gemm, 1),
                      "accumulate_vs_gemm": round(acc / gemm, 2), "peak_rss_gib": round(peak_gib, 2),
                      "max_difference_vs_sklearn": worst, "load_1min_before": load_before,
                      "load_1min_after": load_after}, indent=1))


if __name__ == "__main__":
    main()
