"""Run one depthcache command (or a snippet) in this process and append what it cost to a JSON-lines file: wall
time, peak RSS (ru_maxrss, what ``/usr/bin/time -v`` reports), bytes read through system calls (``rchar``), and
for dask work the tasks run and the time until the first task started (graph building and store checks).

    python benchmarks/measured.py OUT.jsonl LABEL depthcache analyze contributions STORE --force
    python benchmarks/measured.py OUT.jsonl LABEL python -c "..."
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
import time
from pathlib import Path

from dask.callbacks import Callback


class TaskCount(Callback):
    """Counts the tasks of every dask graph this process computes and notes when the first one started."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks, self.first_start = 0, None

    def _start(self, dsk: dict) -> None:
        self.tasks += len(dsk)

    def _pretask(self, key, dsk, state) -> None:  # noqa: ANN001 - dask's callback signature
        if self.first_start is None:
            self.first_start = time.perf_counter()


def read_bytes() -> int:
    """Bytes this process has read through system calls so far."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def main() -> None:
    out, label, command, *args = sys.argv[1:]
    counter = TaskCount()
    counter.register()
    started, before, code = time.perf_counter(), read_bytes(), 0
    try:
        if command == "python" and args[:1] == ["-c"]:
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<snippet>", "exec"), {"__name__": "__main__"})  # noqa: S102 - our own snippet
        else:
            sys.argv = [command, *args]
            runpy.run_module("depthcache.cli", run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    wall = time.perf_counter() - started
    record = {"label": label, "exit": code, "wall_s": round(wall, 2), "read_bytes": read_bytes() - before,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "dask_tasks": counter.tasks,
              "until_first_task_s": None if counter.first_start is None else round(counter.first_start - started, 2)}
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
