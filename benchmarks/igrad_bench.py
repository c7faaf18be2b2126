"""Integrated gradients: this checkout against the code of a git ref (before), interleaved before/now pairs.

    python benchmarks/igrad_bench.py [--before cbde9fc] [--layers 4,14,24] [--pairs 3] [--full]

Every measurement is its own process (``python -c``, PYTHONPATH = the checkout, or the ref's ``depthcache/``
unpacked with ``git archive``): the model is loaded and the prompt's clean run done before the clock starts; timed
are the path integrals of ``--layers`` with each side's defaults (before: ``--steps 256``, 32 points per pass; now:
``--steps 64``, 64 points per pass; both: tolerance 0.01, at most 4,096 intervals), through the functions both
versions share (``residual_path`` + ``integrate_path``). Reported per side: wall and CPU seconds, peak RSS
(``getrusage``), intervals and relative completeness error per layer; medians and ranges over the pairs; the ratio
before / now. Both sides run with the same environment (OMP_WAIT_POLICY=PASSIVE, as the CLI sets it, and the same
thread count). ``--full`` adds one run of the README's command over all layers (``depthcache igrad``, wall clock).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT, ANSWER = "5+7+5+3+1+7=", "28"

CHILD = """
import json, resource, sys, time
import numpy as np
from depthcache.locate.igrad import integrate_path, residual_path
from depthcache.locate.maps import encode
from depthcache.model import clean_run, frozen, load_model
model, layers, steps, batch = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
loaded = load_model(model, device="cpu", progress=False)
prompt = encode(loaded.tokenizer, sys.argv[5], sys.argv[6], None)
clean = clean_run(loaded.model, prompt)
rows = []
wall, cpu = time.perf_counter(), time.process_time()
with frozen(loaded.model):
    for layer in layers:
        r = integrate_path(residual_path(loaded.model, prompt, clean.resid[layer], layer, batch), steps, 0.01, 4096)
        rows.append({"layer": layer, "intervals": r.intervals, "completeness": abs(r.attribution.sum() - (r.f_end -
                     r.f_start)) / max(abs(r.f_end - r.f_start), 0.01)})
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "layers": rows,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def unpack(ref: str, folder: Path) -> Path:
    """The ``depthcache`` package of git ref ``ref``, unpacked under ``folder``; returns the folder."""
    archive = folder / "before.tar"
    subprocess.run(["git", "archive", "-o", str(archive), ref, "depthcache"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def measure(path: Path, model: str, layers: str, steps: int, batch: int) -> dict:
    """One timed child process with ``path`` first on PYTHONPATH, run in ``path``: ``python -c`` puts the working
    directory before PYTHONPATH, so run in the checkout the "before" side would import this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-c", CHILD, model, layers, str(steps), str(batch), PROMPT, ANSWER],
                          env=env, cwd=path, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the child in {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    """'median (min–max)'."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="cbde9fc", help="git ref of the code to compare with")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="4,14,24")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also time the README's command over all layers")
    args = parser.parse_args()
    print(f"load average before: {load_average():.1f}", flush=True)
    results: dict[str, list[dict]] = {"before": [], "now": []}
    with tempfile.TemporaryDirectory() as tmp:
        before = unpack(args.before, Path(tmp))
        for pair in range(args.pairs):
            for side, path, steps, batch in (("before", before, 256, 32), ("now", ROOT, 64, 64)):
                got = measure(path, args.model, args.layers, steps, batch)
                results[side].append(got)
                print(f"pair {pair + 1} {side}: {json.dumps(got)} (load {load_average():.1f})", flush=True)
    for side, runs in results.items():
        print(f"{side}: wall {spread([r['wall'] for r in runs])} s, CPU {spread([r['cpu'] for r in runs])} s, "
              f"peak RSS {spread([r['peak_rss_mib'] for r in runs])} MiB; intervals "
              f"{[row['intervals'] for row in runs[0]['layers']]}, completeness "
              f"{[round(row['completeness'], 4) for row in runs[0]['layers']]}")
    ratios = [b["wall"] / n["wall"] for b, n in zip(results["before"], results["now"])]
    cpu_ratios = [b["cpu"] / n["cpu"] for b, n in zip(results["before"], results["now"])]
    print(f"speed-up before/now: wall {statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}), "
          f"CPU {statistics.median(cpu_ratios):.2f}x ({min(cpu_ratios):.2f}–{max(cpu_ratios):.2f})")
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-m", "depthcache.cli", "igrad", "--model", args.model, "--prompt",
                            PROMPT, "--answer", ANSWER, "--out", f"{tmp}/igrad.zarr"], cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
            print(f"full README command, all layers: {time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU",
                  flush=True)
    print(f"load average after: {load_average():.1f}")


if __name__ == "__main__":
    main()
