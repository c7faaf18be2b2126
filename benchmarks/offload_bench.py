"""A model extracted with most of its layers offloaded to disk against the same extraction in memory, interleaved.

    python benchmarks/offload_bench.py --model smollm2-135m --max-memory cpu=200MB [--tokens 1024] [--pairs 3]

Each pair runs ``depthcache extract`` twice in fresh processes under /usr/bin/time -v, A B A B: in memory (float32,
--device cpu), then with ``--max-memory`` and ``--offload-folder`` (the layers beyond it are read from disk on each
forward pass). Every pair's two stores are compared array by array, bytes for bytes (activations, token columns,
the output summary, the model group's head), and the offloaded store is validated. Prints wall seconds, tokens/s
(of the whole process, model load included), peak RSS (the kernel's, which counts the pages of weight files
read through a memory map) and peak anonymous RSS (sampled every 50 ms: the memory only the process holds), and the
offloaded/in-memory ratios pair by pair (medians and
ranges), with the device map the offloaded run recorded and the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

BIN = Path(sys.executable).parent


def anonymous_mib(pid: int) -> float:
    """RssAnon of a process and its children in MiB: memory only it holds (file-backed pages of weights read from
    a mapped file are not counted; the kernel can drop those under pressure)."""
    total = 0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"RssAnon:\s+(\d+) kB", status)
        total += int(found.group(1)) if found else 0
    return total / 1024


def timed(argv: list[str]) -> tuple[float, float, float]:
    """Run a command under /usr/bin/time -v: (wall seconds, peak RSS in MiB, peak anonymous RSS in MiB, sampled
    every 50 ms); its output is shown on failure."""
    with subprocess.Popen(["/usr/bin/time", "-v", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        peak = 0.0
        while child.poll() is None:
            try:
                peak = max(peak, anonymous_mib(child.pid))
            except psutil.Error:
                pass
            time.sleep(0.05)
        out, err = child.communicate()
    if child.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{out}\n{err}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", err)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    hours, minutes, seconds = (float(g or 0) for g in wall.groups())
    return hours * 3600 + minutes * 60 + seconds, int(rss.group(1)) / 1024, peak


def arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of a store (root and subgroups) by path, read whole."""
    return {path: np.asarray(arr[...]) for path, arr in zarr.open_group(str(store), mode="r").arrays()} | {
        f"model/{path}": np.asarray(arr[...])
        for path, arr in zarr.open_group(str(store / "model"), mode="r").arrays()}


def identical(a: Path, b: Path) -> list[str]:
    """Names of the arrays whose bytes differ between two stores (or that only one has)."""
    left, right = arrays(a), arrays(b)
    return sorted(name for name in left.keys() | right.keys()
                  if name not in left or name not in right or left[name].tobytes() != right[name].tobytes())


def spread(values: list[float]) -> str:
    """Median (min-max)."""
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-memory", required=True, help="e.g. cpu=200MB: small enough that most layers go to disk")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/offload-bench")
    args = parser.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = ["extract", "--model", args.model, "--max-tokens", str(args.tokens), "--batch-size", str(args.batch_size),
              "--dtype", "float32", "--device", "cpu", "--model-dtype", "float32", "--no-progress"]
    runs: dict[str, list[tuple[float, float, float]]] = {"memory": [], "offload": []}
    load = [os.getloadavg()[0]]
    for pair in range(args.pairs):
        stores = {kind: work / f"{kind}-{pair}.zarr" for kind in runs}
        runs["memory"].append(timed([str(BIN / "depthcache"), *common, "--out", str(stores["memory"])]))
        runs["offload"].append(timed([str(BIN / "depthcache"), *common, "--out", str(stores["offload"]),
                                      "--max-memory", args.max_memory, "--offload-folder", str(work / "offload")]))
        differ = identical(stores["memory"], stores["offload"])
        figures = "; ".join(f"{kind} {runs[kind][-1][0]:.1f} s, RSS {runs[kind][-1][1]:.0f} MiB, anonymous "
                            f"{runs[kind][-1][2]:.0f} MiB" for kind in runs)
        print(f"pair {pair}: {'bit-identical' if not differ else 'DIFFERENT: ' + ', '.join(differ)} ({figures})",
              flush=True)
        subprocess.run([str(BIN / "depthcache"), "validate", str(stores["offload"])], check=True)
        for kind in runs:
            if pair:
                shutil.rmtree(stores[kind])
    load.append(os.getloadavg()[0])
    placed = zarr.open_group(str(work / "offload-0.zarr"), mode="r").attrs["depthcache"]["options"]
    print(f"model {args.model}, {args.tokens} tokens, batch {args.batch_size}, float32 on CPU, {args.pairs} pairs; "
          f"offloaded: --max-memory {args.max_memory}, device map {placed.get('device_map')}; load average "
          f"{load[0]:.1f} -> {load[1]:.1f}")
    for kind, results in runs.items():
        walls, rss, anon = ([r[i] for r in results] for i in range(3))
        print(f"{kind:8} wall s {spread(walls)}  tokens/s {spread([args.tokens / w for w in walls])}  "
              f"peak RSS MiB {spread(rss)}  peak anonymous RSS MiB {spread(anon)}")
    for i, name in enumerate(("wall", "peak RSS", "peak anonymous RSS")):
        print(f"offload / memory, {name}: {spread([o[i] / m[i] for m, o in zip(runs['memory'], runs['offload'])])}")


if __name__ == "__main__":
    main()
