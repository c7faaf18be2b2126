"""Crash consistency: kill extractions at random moments (SIGKILL, SIGINT, SIGTERM) and check that resuming gives a
store bit-identical to an uninterrupted run.

For each seed the driver starts ``depthcache extract --resume`` as a real process, waits for a random moment (a
random share of the tokens committed, then a random pause; sometimes before the store exists), sends a random
signal, and checks what every interrupt must leave: a store (or nothing) that opens and validates, progress on a
chunk boundary, and for SIGINT/SIGTERM exactly one ``error: interrupted ...`` line saying to resume with exit status
128 + signal. After the kills a last run completes the store, which must equal the reference array by array, byte
for byte, and pass a full validation (every checksum).

    python tests/crash_driver.py --model MODEL_DIR --data DATA.jsonl --workdir DIR --seeds 0-9 --kills 4

Each extraction is a new ``python -m depthcache.cli`` process; ``--fork`` forks them instead from a server that
imported depthcache, torch and transformers once (the same code from the command line's ``main`` on, seconds
faster per start). ``tests/test_crash.py`` runs a small fixed seed set with ``--fork``; CI can run more seeds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import zarr

SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)
CHUNK = 32
TIMEOUT = 300.0


@dataclass(frozen=True)
class Kill:
    """One interrupt: the signal, the share of tokens to wait for (None: right after start), then a pause."""

    signum: int
    share: float | None
    pause: float


def extract_args(model: Path, data: Path, out: Path) -> list[str]:
    """The command line (after ``depthcache``) of a small many-chunk extraction, resumable: the same command
    completes or continues the store."""
    return ["extract", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--chunk-tokens", str(CHUNK), "--token-shard-tokens", str(3 * CHUNK),
            "--max-tokens", "0", "--device", "cpu", "--no-progress", "--resume"]  # 2.0: a kill may land inside the
    # read-modify-write of a token shard (three chunks each)


class Launched(Protocol):
    """A running extraction: what the driver needs of a process."""

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""

    def send_signal(self, signum: int) -> None:
        """Send it a signal."""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to end; its exit status (negative: the signal that ended it)."""


def launch_process(args: list[str], stderr: IO[str]) -> Launched:
    """``python -m depthcache.cli ARGS`` as a new process (interpreter start and imports included)."""
    return subprocess.Popen([sys.executable, "-m", "depthcache.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=stderr)


def cli_in_child(args: list[str], stderr_path: str) -> None:
    """The body of a forked extraction: the command line's ``main`` with stderr to a file."""
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    from depthcache.cli import main as cli

    cli(args, prog_name="depthcache")


@dataclass
class Forked:
    """A process forked from a server that imported depthcache, torch and transformers once (the same ``main``
    as the command line, without the seconds of imports per start)."""

    process: Any

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        """Send it a signal."""
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to end; its exit status (negative: the signal that ended it)."""
        self.process.join(timeout)
        return self.process.exitcode


def fork_launcher() -> Callable[[list[str], IO[str]], Launched]:
    """A launcher forking from a forkserver that preloaded the command line and the extraction engine."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["depthcache.cli", "depthcache.extraction.engine"])

    def launch(args: list[str], stderr: IO[str]) -> Launched:
        process = context.Process(target=cli_in_child, args=(args, stderr.name))
        process.start()
        return Forked(process)
    return launch


def committed(store: Path) -> int:
    """Tokens the store says are committed (0 while it does not exist yet)."""
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]["progress"]["tokens_committed"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def plan_kills(seed: int, kills: int) -> list[Kill]:
    """The seed's interrupts: every signal at least once when there are three or more."""
    rng = random.Random(seed)
    signals = list(SIGNALS) * (kills // 3) + [rng.choice(SIGNALS) for _ in range(kills % 3)]
    rng.shuffle(signals)
    return [Kill(s, None if rng.random() < 0.2 else rng.uniform(0.05, 0.8), rng.uniform(0.0, 0.4)) for s in signals]


def wait_for_moment(proc: Launched, store: Path, kill: Kill, total: int) -> None:
    """Return at the kill's moment, or when the process has exited."""
    deadline = time.monotonic() + TIMEOUT
    start = committed(store)
    def started() -> bool:
        return store.exists() or any(store.parent.glob(f".{store.name}.creating-*"))
    while proc.poll() is None and time.monotonic() < deadline:
        if kill.share is None and (started() or kill.signum == signal.SIGKILL):
            break
        if kill.share is not None and committed(store) >= min(total - CHUNK, start + kill.share * (total - start)):
            break
        time.sleep(0.01)
    time.sleep(kill.pause)


def interrupt_problems(kill: Kill, code: int, stderr: str, store: Path, total: int) -> list[str]:
    """What is wrong after one interrupt (empty when everything it must leave is there)."""
    from depthcache.errors import DepthcacheError
    from depthcache.store.io import open_group
    from depthcache.store.schema import check_store

    name = signal.Signals(kill.signum).name
    problems = []
    if code == 0:
        return [] if committed(store) == total else [f"{name}: exit 0 with {committed(store)} of {total} tokens"]
    if committed(store) == total:  # the signal came as the finished process was exiting: nothing to resume
        lines = stderr.strip().splitlines()
        ok = code in (128 + kill.signum, -kill.signum) and len(lines) <= 1 and all(
            line.startswith("error: interrupted") for line in lines)
        return [] if ok else [f"{name} after completion: exit {code}: {stderr[-500:]}"]
    if kill.signum == signal.SIGKILL:
        problems += [] if code == -signal.SIGKILL else [f"SIGKILL: exit status {code}"]
    elif code != 128 + kill.signum and code != -kill.signum:  # -signum: the signal came before Python set up
        problems.append(f"{name}: exit status {code}, expected {128 + kill.signum}: {stderr[-300:]}")
    elif code == 128 + kill.signum:
        lines = stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith(f"error: interrupted by {name}") or "--resume" not in lines[0]:
            problems.append(f"{name}: stderr is not one 'error: interrupted ... --resume' line: {stderr[-500:]}")
    if "Traceback" in stderr:
        problems.append(f"{name}: traceback: {stderr[-500:]}")
    if store.exists():
        if committed(store) % CHUNK and committed(store) != total:
            problems.append(f"{name}: progress {committed(store)} is not on a chunk boundary")
        try:
            check_store(open_group(str(store)))
        except DepthcacheError as exc:
            problems.append(f"{name}: the store does not open: {exc}")
    return problems


def array_bytes(store: Path) -> dict[str, bytes]:
    """Raw bytes of every array of a store, its model group included (NaNs compare equal this way)."""
    import depthcache  # noqa: F401 - registers the bfloat16 data type

    root = zarr.open_group(str(store), mode="r")
    found = {}
    def collect(group: zarr.Group, prefix: str) -> None:
        for name, array in group.arrays():
            found[prefix + name] = np.ascontiguousarray(array[...]).tobytes()
        for name, sub in group.groups():
            collect(sub, f"{prefix}{name}/")
    collect(root, "")
    return found


def run_seed(seed: int, model: Path, data: Path, workdir: Path, reference: dict[str, bytes], total: int,
             kills: int, launch: Callable[[list[str], IO[str]], Launched]) -> list[str]:
    """Kill one extraction ``kills`` times as the seed says, complete it, compare with the reference."""
    from depthcache.store.schema import validate

    store = workdir / f"seed{seed}.zarr"
    problems: list[str] = []
    for kill in plan_kills(seed, kills) + [None]:  # None: the last run, which completes the store
        with open(workdir / f"seed{seed}.stderr", "w+") as err:
            proc = launch(extract_args(model, data, store), err)
            if kill is not None:
                wait_for_moment(proc, store, kill, total)
                if proc.poll() is None:
                    proc.send_signal(kill.signum)
            code = proc.wait(timeout=TIMEOUT)
            err.seek(0)
            stderr = err.read()
        if kill is None and code:
            return problems + [f"seed {seed}: the last run failed ({code}): {stderr[-500:]}"]
        if kill is not None:
            problems += [f"seed {seed}: {p}" for p in interrupt_problems(kill, code, stderr, store, total)]
    got = array_bytes(store)
    problems += [f"seed {seed}: {name} differs from the uninterrupted run" for name in reference
                 if got.get(name) != reference[name]]
    extra = sorted(set(got) - set(reference))
    problems += [f"seed {seed}: arrays {extra} are extra"] if extra else []
    problems += [f"seed {seed}: {p}" for p in validate(str(store)).report()]
    leftovers = [p.name for p in workdir.glob(f".seed{seed}.zarr.creating-*")]
    problems += [f"seed {seed}: temporary folders left behind: {leftovers}"] if leftovers else []
    return problems


def reference_store(model: Path, data: Path, workdir: Path) -> tuple[dict[str, bytes], int]:
    """An uninterrupted extraction's arrays and token count (the same command, never interrupted)."""
    store = workdir / "reference.zarr"
    if not store.exists():
        subprocess.run([sys.executable, "-m", "depthcache.cli", *extract_args(model, data, store)], check=True,
                       capture_output=True, timeout=TIMEOUT)
    return array_bytes(store), committed(store)


def run(seeds: list[int], model: Path, data: Path, workdir: Path, kills: int, fork: bool = False) -> list[str]:
    """Every seed's problems (empty: every interrupt was consistent and every resume bit-identical); ``fork``:
    start extractions from a forkserver instead of new interpreters (faster, the same code from ``main`` on)."""
    workdir.mkdir(parents=True, exist_ok=True)
    reference, total = reference_store(model, data, workdir)
    launch = fork_launcher() if fork else launch_process
    return [p for seed in seeds for p in run_seed(seed, model, data, workdir, reference, total, kills, launch)]


def parse_seeds(text: str) -> list[int]:
    """'0-4,9' → [0, 1, 2, 3, 4, 9]."""
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a local HF model folder (small)")
    parser.add_argument("--data", type=Path, required=True, help="a text or JSONL dataset")
    parser.add_argument("--workdir", type=Path, required=True, help="where the stores go")
    parser.add_argument("--seeds", default="0-4", help="seed set, e.g. 0-9 or 1,5,7")
    parser.add_argument("--kills", type=int, default=3, help="interrupts per seed")
    parser.add_argument("--fork", action="store_true", help="fork extractions from a preloaded server (faster)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    problems = run(parse_seeds(args.seeds), args.model, args.data, args.workdir, args.kills, args.fork)
    print("\n".join(problems) or f"all seeds consistent: {args.seeds}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
