"""Extraction speed against a plain forward pass and against the tools people use instead, interleaved.

    python benchmarks/extract_bench.py [--tokens 4096] [--pairs 3] [--peer-python benchmarks/.venv/bin/python]

Every tool runs in its own fresh process, paired with the floor (a plain forward pass over the same batches, same
dtype, inference mode, nothing else; benchmarks/extraction/forward.py) and run A B A B for ``--pairs`` pairs, so
load from other processes hits both sides of each ratio. Reported per tool: medians and ranges (min-max) of
whole-process wall time, time after load (from the first forward pass to exit), time to the first batch, tokens/s
and peak RSS, and the ratios to the floor taken pair by pair; the 1-minute load average before and after each tool.

Peers (benchmarks/extraction/): hand-written hooks + np.save (float32), nnsight (trace + .save() + torch.save),
TransformerLens's TransformerBridge (run_with_cache + torch.save). They run in the benchmark-only environment
(``make bench`` builds benchmarks/.venv); depthcache runs with this interpreter. Afterwards the peers' tensors are
compared with the depthcache stores (float32: exact or the largest difference; bf16: in units of bf16 rounding),
and ``depthcache analyze contributions`` on the bf16 store is paired with a numpy script over the hooks' .npy files.
Writes the table to ``--dir``/extract_bench.md and the raw runs to ``--dir``/extract_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "extraction"
REPO = HERE.parent


@dataclass
class Run:
    """One finished process: wall seconds, CPU seconds, peak RSS (MiB) and its own timing line (if it wrote one)."""

    wall: float
    cpu: float
    peak_mib: float
    after_load: float | None = None
    to_first_batch: float | None = None


@dataclass
class Tool:
    """A command to time, where its output goes, and the Python that runs it."""

    name: str
    argv: list[str]
    out: Path
    env: dict[str, str] = field(default_factory=dict)


def run_measured(argv: list[str], env: dict[str, str], timings: Path) -> Run:
    """Start ``argv``, wait for it, and read its CPU time and peak RSS (the kernel's accounting, os.wait4) and the
    timing line it appended to ``timings``."""
    timings.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=SCRIPTS)
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    run = Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)
    if timings.exists():
        line = json.loads(timings.read_text().splitlines()[-1])
        run.after_load, run.to_first_batch = line["after_load_s"], line["to_first_batch_s"]
    return run


def interleaved(tool: Tool, floor: Tool, pairs: int, work: Path, warmup: bool = True
                ) -> tuple[list[Run], list[Run], tuple, tuple]:
    """``pairs`` runs of the tool and of the floor, A B A B, after one unrecorded warm-up pair if ``warmup``."""
    timings = work / "timings.jsonl"
    runs: dict[str, list[Run]] = {tool.name: [], floor.name: []}
    load_before = os.getloadavg()
    for i in range(pairs + warmup):
        for t in (tool, floor):
            shutil.rmtree(t.out, ignore_errors=True)
            run = run_measured(t.argv, t.env, timings)
            counted = i >= warmup  # a warm-up pair fills the page cache and the dequantized-model cache
            if counted:
                runs[t.name].append(run)
            print(f"  {t.name:<16} wall {run.wall:6.1f} s  after load {run.after_load or 0:6.1f} s  "
                  f"peak {run.peak_mib:,.0f} MiB{'' if counted else '  (warm-up)'}", flush=True)
    return runs[tool.name], runs[floor.name], load_before, os.getloadavg()


def summary(values: list[float]) -> dict[str, float]:
    """Median and range of a list of figures."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def disk_bandwidth(folder: Path, mib: int = 512) -> float:
    """Durable sequential write bandwidth (MiB/s): ``mib`` MiB in 8 MiB blocks, fsync, delete."""
    block = np.random.default_rng(0).integers(0, 255, 8 * 2**20, dtype=np.uint8).tobytes()
    path = folder / "bandwidth.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mib // 8):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return mib / seconds


def activation_bytes(store: Path) -> int:
    """Bytes on disk of a store without its model/ group (what is written after the first batch)."""
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and "model" not in f.relative_to(store).parts)


def default_model_dir() -> Path:
    """The dequantized SmolLM2-135M folder that ``depthcache extract`` caches (float32 Hugging Face format)."""
    root = Path(os.environ.get("DEPTHCACHE_CACHE", Path.home() / ".cache" / "depthcache")).expanduser() / "gguf"
    for config in sorted(root.glob("*/config.json")):
        c = json.loads(config.read_text())
        if c.get("model_type") == "llama" and c.get("hidden_size") == 576 and c.get("num_hidden_layers") == 30:
            return config.parent
    raise SystemExit(f"no dequantized SmolLM2-135M under {root}: run `depthcache extract --out X --max-tokens 16` "
                     "once, or pass --model-dir")


def tools(args: argparse.Namespace, work: Path) -> tuple[Tool, list[Tool]]:
    """The floor and every tool to pair with it."""
    common = ["--model-dir", str(args.model_dir), "--max-tokens", str(args.tokens), "--timings",
              str(work / "timings.jsonl")]
    peer = args.peer_python

    def script(name: str, file: str, python: str) -> Tool:
        out = work / name
        return Tool(name, [python, str(SCRIPTS / file), "--out", str(out), *common], out)

    def depthcache(dtype: str) -> Tool:
        out = work / f"depthcache-{dtype}.zarr"
        return Tool(f"depthcache {dtype}", [sys.executable, str(SCRIPTS / "timed.py"), str(work / "timings.jsonl"),
                                            f"depthcache {dtype}", str(args.tokens), "depthcache.cli", "extract",
                                            "--out", str(out), "--max-tokens", str(args.tokens), "--dtype", dtype,
                                            "--device", "cpu", "--no-progress"], out, {"PYTHONPATH": str(REPO)})

    floor = script("forward", "forward.py", sys.executable)
    chosen = {"hooks": script("hooks", "hooks_npy.py", peer),
              "nnsight": script("nnsight", "nnsight_save.py", peer),
              "transformerlens": script("transformerlens", "tlens.py", peer),
              "depthcache-bfloat16": depthcache("bfloat16"), "depthcache-float32": depthcache("float32")}
    return floor, [chosen[name] for name in args.tools]


def store_arrays(store: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Activation arrays of a depthcache store, as float32 (layer, token, d_model)."""
    sys.path.insert(0, str(REPO))
    import zarr

    import depthcache.dtypes as dtypes

    dtypes.register_bfloat16()
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][...]).astype(np.float32) for name in names}


def peer_arrays(folder: Path) -> dict[str, np.ndarray]:
    """A peer's per-batch files concatenated along tokens, float32 (layer, token, d_model) per site."""
    sites = ("resid_pre", "attn_out", "mlp_out")
    npy = sorted(folder.glob("*.npy"))
    if npy:
        return {s: np.concatenate([np.load(f) for f in npy if f.stem.endswith(s)], axis=1) for s in sites}
    import torch

    batches = [torch.load(f) for f in sorted(folder.glob("*.pt"))]
    return {s: torch.cat([b[s] for b in batches], dim=1).float().numpy() for s in sites}


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 → nearest bfloat16 (ties to even) → float32, as torch's cast does."""
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def equality(work: Path, done: list[str]) -> list[str]:
    """Lines saying how each peer's tensors compare with the depthcache stores written in this run."""
    sites = ("resid_pre", "attn_out", "mlp_out")
    stores = {dtype: store_arrays(work / f"depthcache-{dtype}.zarr", sites)
              for dtype in ("float32", "bfloat16") if f"depthcache-{dtype}" in done}
    lines = []
    for peer in ("hooks", "nnsight", "transformerlens"):
        if peer not in done:
            continue
        theirs = peer_arrays(work / peer)
        for dtype, ours in stores.items():
            expect = theirs if dtype == "float32" else {s: bf16_round(v) for s, v in theirs.items()}
            diffs = {s: float(np.max(np.abs(ours[s] - expect[s]))) for s in sites}
            scale = {s: float(np.max(np.abs(expect[s]))) for s in sites}
            exact = all(d == 0 for d in diffs.values())
            what = "bit-identical" if exact else "max |diff| " + ", ".join(
                f"{s} {diffs[s]:.2e} ({diffs[s] / scale[s]:.1e} of max |x|)" for s in sites)
            ref = "the float32 store" if dtype == "float32" else "the bf16 store vs the peer rounded to bf16"
            lines.append(f"{peer} vs {ref}: {what}")
    return lines


def equality_in_child(work: Path, done: list[str]) -> list[str]:
    """``equality`` in a child process: the driver stays small, and a child's peak RSS (os.wait4) starts at its
    parent's, so loading every tensor here would inflate the figures of the runs after it."""
    proc = subprocess.run([sys.executable, __file__, "--equality", str(work), *done], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(proc.stdout.splitlines()[-1])


def analysis_pair(args: argparse.Namespace, work: Path) -> dict:
    """``depthcache analyze contributions`` on the bf16 store vs a numpy script over the hooks' files, interleaved."""
    store = work / "depthcache-bfloat16.zarr"
    ours = Tool("analyze contributions", [sys.executable, "-m", "depthcache.cli", "analyze", "contributions",
                                          str(store), "-p", "include_first=true", "--force"], work / "none",
                {"PYTHONPATH": str(REPO)})
    numpy_script = Tool("numpy over .npy", [args.peer_python, str(SCRIPTS / "contributions_npy.py"),
                                            str(work / "hooks")], work / "none")
    a, b, before, after = interleaved(ours, numpy_script, args.pairs, work, warmup=False)
    return {"analyze": [r.__dict__ for r in a], "numpy": [r.__dict__ for r in b], "load": [before, after]}


def fmt(s: dict[str, float], digits: int = 2) -> str:
    """'median (min-max)'."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def report(results: dict, args: argparse.Namespace) -> str:
    """The markdown table of one benchmark run."""
    tokens = args.tokens
    lines = [f"{results['date']}, {results['machine']}; {tokens:,} tokens of pydoc-topics, windows of 128, batches "
             f"of 8, SmolLM2-135M float32, all 30 layers x resid_pre, attn_out, mlp_out; {args.pairs} interleaved "
             "pairs per tool (medians, ranges in brackets).", "",
             "| tool | after load / floor | whole process / floor | tokens/s after load | whole process s | "
             "to first batch s | peak RSS MiB | load avg before → after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["tools"].items():
        lines.append(f"| {name} | {fmt(r['ratio_after_load'])} | {fmt(r['ratio_wall'])} | "
                     f"{fmt(r['tok_s'], 0)} | {fmt(r['wall'], 1)} | {fmt(r['to_first_batch'], 1)} | "
                     f"{fmt(r['peak_mib'], 0)} | {r['load'][0][0]:.1f} → {r['load'][1][0]:.1f} |")
        lines.append(f"| (its floor: plain forward) | 1 | 1 | {fmt(r['floor_tok_s'], 0)} | {fmt(r['floor_wall'], 1)} | "
                     f"{fmt(r['floor_to_first_batch'], 1)} | {fmt(r['floor_peak_mib'], 0)} | |")
    if "disk_mib_s" in results:
        lines += ["", f"Disk: {results['disk_mib_s']:,.0f} MiB/s durable sequential write."]
        for name, r in results["tools"].items():
            if "bound" in r:
                lines.append(f"- {name}: {r['bytes'] / 2**20:,.0f} MiB of activations on disk; after load / "
                             f"(floor + bytes / disk bandwidth) = {fmt(r['bound'])}")
    if results.get("equality"):
        lines += ["", "Equality of the tensors:"] + [f"- {line}" for line in results["equality"]]
    if "analysis" in results:
        a = results["analysis"]
        lines += ["", f"`depthcache analyze contributions` (bf16 store, whole process) / numpy script over the hooks' "
                      f".npy files: {fmt(a['ratio'])}; {fmt(a['analyze_wall'], 1)} s vs {fmt(a['numpy_wall'], 1)} s, "
                      f"peak {fmt(a['analyze_peak'], 0)} vs {fmt(a['numpy_peak'], 0)} MiB; load "
                      f"{a['load'][0][0]:.1f} → {a['load'][1][0]:.1f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--tools", nargs="+", default=["hooks", "nnsight", "transformerlens", "depthcache-bfloat16",
                                                       "depthcache-float32"])
    parser.add_argument("--peer-python", default=str(HERE / ".venv" / "bin" / "python"),
                        help="Python of the benchmark-only environment with nnsight and transformer-lens.")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--dir", type=Path, default=REPO / "runs" / "extract-bench")
    parser.add_argument("--no-analysis", action="store_true", help="Skip the analyze-contributions pair.")
    parser.add_argument("--warmup", choices=["first", "each", "none"], default="each",
                        help="An unrecorded warm-up pair before each tool's pairs, the first tool's only, or none.")
    parser.add_argument("--equality", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.equality:
        print(json.dumps(equality(Path(args.equality[0]), args.equality[1:])))
        return
    args.model_dir = args.model_dir or default_model_dir()
    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    floor, chosen = tools(args, work)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    results: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "machine": f"{os.cpu_count()} CPUs, {memory_gib:.0f} GiB, {platform.machine()}",
                     "tokens": args.tokens, "tools": {}}
    raw: dict = {}
    for n, tool in enumerate(chosen):
        print(f"{tool.name} vs the plain forward pass", flush=True)
        warm = args.warmup == "each" or (args.warmup == "first" and n == 0)
        a, b, before, after = interleaved(tool, floor, args.pairs, work, warm)
        raw[tool.name] = {"tool": [r.__dict__ for r in a], "floor": [r.__dict__ for r in b]}
        results["tools"][tool.name] = {
            "ratio_after_load": summary([x.after_load / y.after_load for x, y in zip(a, b)]),
            "ratio_wall": summary([x.wall / y.wall for x, y in zip(a, b)]),
            "tok_s": summary([args.tokens / x.after_load for x in a]),
            "floor_tok_s": summary([args.tokens / y.after_load for y in b]),
            "wall": summary([x.wall for x in a]), "floor_wall": summary([y.wall for y in b]),
            "to_first_batch": summary([x.to_first_batch for x in a]),
            "floor_to_first_batch": summary([y.to_first_batch for y in b]),
            "peak_mib": summary([x.peak_mib for x in a]), "floor_peak_mib": summary([y.peak_mib for y in b]),
            "load": [before, after]}
        (work / "extract_bench.md").write_text(report(results, args))  # so far, in case the run is cut short
    stores = [t for t in chosen if t.name.startswith("depthcache")]
    if stores:
        results["disk_mib_s"] = disk_bandwidth(work)
        for tool in stores:
            r, runs = results["tools"][tool.name], raw[tool.name]
            r["bytes"] = activation_bytes(tool.out)
            write_s = r["bytes"] / 2**20 / results["disk_mib_s"]
            r["bound"] = summary([x["after_load"] / (y["after_load"] + write_s)
                                  for x, y in zip(runs["tool"], runs["floor"])])
    done = [t.name.replace(" ", "-") for t in chosen]
    results["equality"] = equality_in_child(work, done)
    if not args.no_analysis and "hooks" in done and "depthcache-bfloat16" in done:
        print("analyze contributions vs numpy", flush=True)
        pair = analysis_pair(args, work)
        raw["analysis"] = pair
        results["analysis"] = {
            "ratio": summary([x["wall"] / y["wall"] for x, y in zip(pair["analyze"], pair["numpy"])]),
            "analyze_wall": summary([x["wall"] for x in pair["analyze"]]),
            "numpy_wall": summary([y["wall"] for y in pair["numpy"]]),
            "analyze_peak": summary([x["peak_mib"] for x in pair["analyze"]]),
            "numpy_peak": summary([y["peak_mib"] for y in pair["numpy"]]), "load": pair["load"]}
    text = report(results, args)
    (work / "extract_bench.md").write_text(text)
    (work / "extract_bench.json").write_text(json.dumps({"results": results, "runs": raw}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
