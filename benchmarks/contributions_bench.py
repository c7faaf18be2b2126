"""`depthcache analyze contributions` against a numpy script over hand-written hooks' .npy files, whole process each.

    python benchmarks/contributions_bench.py [--workdir /tmp/depthcache-contributions-bench] [--tokens 4096]
                                             [--pairs 3] [--before REF] [--model-dir DIR]

Builds once (kept in --workdir): a float32 store of --tokens tokens of pydoc-topics from SmolLM2-135M (`depthcache
extract --dtype float32`, windows of 128, batches of 8, all 30 layers, resid/attn/mlp) and the same activations as
.npy files from benchmarks/extraction/hooks_npy.py (one file per batch and site, real tokens only). Then, in
interleaved rounds, each its own fresh process timed from outside (wall clock, CPU time and peak RSS from
``os.wait4``):

- numpy: benchmarks/extraction/contributions_npy.py over the .npy files (the yardstick);
- now: ``python -m depthcache.cli analyze contributions STORE -p include_first=true --force`` from this checkout;
- before (with --before REF): the same command from REF's ``depthcache/`` (``git archive``), run in its own folder.

Each side writes its cached result under its own --results folder, so neither reads the other's. The order within a
round rotates, so no side always runs first. Checked before timing: the analysis's numbers equal the numpy script's
(float32 products summed in a different order: rtol 1e-5), and with --before, every variable of the result is
bit-identical between the two checkouts. Prints medians and ranges of the per-round ratios to numpy, and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = HERE / "extraction"

RESULT = """
import json, sys
import numpy as np
from depthcache.analyze import run
ds = run("contributions", sys.argv[1], force=True, results_dir=sys.argv[2], include_first=True)
np.savez(sys.argv[3], **{name: ds[name].values for name in ds.data_vars})
"""


def default_model_dir() -> Path:
    """The dequantized SmolLM2-135M folder that ``depthcache extract`` caches (float32 Hugging Face format)."""
    sys.path.insert(0, str(HERE))
    from extract_bench import default_model_dir as found

    return found()


def build(work: Path, tokens: int, model_dir: Path | None) -> tuple[Path, Path]:
    """The float32 store and the hooks' .npy folder (made once)."""
    store, hooks = work / "store-float32.zarr", work / "hooks"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not (store / "zarr.json").exists():
        subprocess.run([sys.executable, "-m", "depthcache.cli", "extract", "--out", str(store), "--max-tokens",
                        str(tokens), "--dtype", "float32", "--no-progress"], check=True, env=env)
    if not any(hooks.glob("*_mlp_out.npy")):
        subprocess.run([sys.executable, str(SCRIPTS / "hooks_npy.py"), "--model-dir",
                        str(model_dir or default_model_dir()), "--out", str(hooks), "--max-tokens", str(tokens)],
                       check=True, cwd=SCRIPTS)
    return store, hooks


def unpack(ref: str, folder: Path) -> Path:
    """The ``depthcache`` package of git ref ``ref`` under ``folder`` (fresh)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "code.tar"
    subprocess.run(["git", "archive", "-o", str(archive), ref, "depthcache"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Run ``command`` to the end; wall seconds, CPU seconds and peak RSS (MiB) of the process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def numpy_result(hooks: Path, out: Path) -> dict[str, np.ndarray]:
    """The numpy script's mean/std/max per quantity."""
    subprocess.run([sys.executable, str(SCRIPTS / "contributions_npy.py"), str(hooks), "--save", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return dict(np.load(out))


def analysis_result(code: Path, store: Path, results: Path, out: Path) -> dict[str, np.ndarray]:
    """Every variable of the contributions result computed by the checkout at ``code``."""
    subprocess.run([sys.executable, "-c", RESULT, str(store), str(results), str(out)], check=True, cwd=code,
                   env={**os.environ, "PYTHONPATH": str(code)})
    return dict(np.load(out))


def check(work: Path, store: Path, hooks: Path, before: Path | None) -> list[str]:
    """The analysis against the numpy script, and against the ``before`` checkout; lines for the report."""
    ref = numpy_result(hooks, work / "numpy.npz")
    now = analysis_result(ROOT, store, work / "results-check", work / "now.npz")
    pairs = {"rel_mean": ref["mean"][0:3], "cos_mean": ref["mean"][3:6], "norm_mean": ref["mean"][6:9],
             "resid_norm_mean": ref["mean"][9], "turn_cos_mean": ref["mean"][10], "rel_std": ref["std"][0:3],
             "cos_std": ref["std"][3:6], "turn_cos_std": ref["std"][10], "rel_max": ref["max"][0:3],
             "norm_max": ref["max"][6:9], "resid_norm_max": ref["max"][9]}
    worst = 0.0
    for name, expect in pairs.items():
        np.testing.assert_allclose(now[name], expect, rtol=1e-5, atol=0, err_msg=name)
        worst = max(worst, float(np.max(np.abs(now[name] - expect) / np.abs(expect))))
    assert int(now["tokens_used"]) == int(ref["count"]), (now["tokens_used"], ref["count"])
    lines = [f"analysis vs numpy script: {len(pairs)} variables equal within rtol 1e-5 (largest relative "
             f"difference {worst:.1e}), {int(ref['count']):,} tokens each"]
    if before is not None:
        old = analysis_result(before, store, work / "results-check-before", work / "before.npz")
        assert old.keys() == now.keys(), (old.keys(), now.keys())
        for name in now:
            np.testing.assert_array_equal(now[name], old[name], err_msg=name)
        lines.append(f"before vs now: all {len(now)} result variables bit-identical")
    return lines


def spread(values: list[float], digits: int = 2) -> str:
    """'median (min-max)'."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/depthcache-contributions-bench"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=3, help="rounds (each runs every side once)")
    parser.add_argument("--before", default=None, help="git ref whose depthcache/ to time as well")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--no-check", action="store_true", help="skip the equality checks")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    store, hooks = build(work, args.tokens, args.model_dir)
    before = unpack(args.before, work / "before") if args.before else None
    if not args.no_check:
        for line in check(work, store, hooks, before):
            print(line, flush=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    analyze = ["analyze", "contributions", str(store), "-p", "include_first=true", "--force"]
    sides = {"numpy": ([sys.executable, str(SCRIPTS / "contributions_npy.py"), str(hooks)], SCRIPTS, env),
             "now": ([sys.executable, "-m", "depthcache.cli", *analyze, "--results", str(work / "results-now")],
                     ROOT, {**env, "PYTHONPATH": str(ROOT)})}
    if before is not None:
        sides["before"] = ([sys.executable, "-m", "depthcache.cli", *analyze, "--results",
                            str(work / "results-before")], before, {**env, "PYTHONPATH": str(before)})
    names = list(sides)
    for name in names:  # warm-up: page cache, .pyc files
        timed(*sides[name])
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_ in range(args.pairs):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            runs[name].append(timed(*sides[name]))
            print(f"round {round_ + 1} {name}: {json.dumps(runs[name][-1])} (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    load_after = os.getloadavg()
    print(f"{args.tokens:,} tokens, {args.pairs} rounds; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)}")
    for name in names:
        r = runs[name]
        print(f"{name:<7} wall {spread([x['wall'] for x in r])} s, CPU {spread([x['cpu'] for x in r])} s, "
              f"peak RSS {spread([x['peak_mib'] for x in r], 0)} MiB")
    for name in names[1:]:
        ratios = [a["wall"] / b["wall"] for a, b in zip(runs[name], runs["numpy"])]
        print(f"{name} / numpy per round (wall): {spread(ratios)}")
    (work / "contributions_bench.json").write_text(json.dumps({"runs": runs, "load": [load_before, load_after],
                                                               "tokens": args.tokens}, indent=1))


if __name__ == "__main__":
    main()
