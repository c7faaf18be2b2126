"""SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH session) during an extraction: stop at the last committed
chunk, never inside one, and say how to resume. (SIGKILL cannot be caught: the store is consistent after it too,
since every commit is atomic.)"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from depthcache.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_interrupted(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - signal handler signature
    """Signal handler: unwind the main thread with Interrupted (the writer thread finishes its chunk first)."""
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the body runs, SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread instead of ending the
    process mid-write; a signal the parent set to be ignored (a background job's SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def progress_of(group: Path) -> dict | None:
    """The progress recorded in a store's (or run's) zarr.json, or None when there is none to read."""
    try:
        progress = json.loads((group / "zarr.json").read_text(encoding="utf-8"))["attributes"]["depthcache"]["progress"]
        return progress if isinstance(progress, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def committed_note(out: str) -> str:
    """What an interrupted extraction left in ``out``: its committed tokens (and those of an unfinished skip run),
    or that nothing was created."""
    root = progress_of(Path(out))
    if root is None:
        return f"{out} keeps every chunk committed so far" if Path(out).exists() else f"nothing was written to {out}"
    note = f"{out} keeps its {int(root['tokens_committed']):,} committed tokens"
    for run in sorted(Path(out).glob("runs/*")):
        progress = progress_of(run)
        if progress is not None and not progress.get("complete", True):
            note += f", run {run.name} its {int(progress['tokens_committed']):,}"
    return note


def interrupted_message(signum: int, out: str) -> str:
    """The one line an interrupted extraction prints: what is kept and how to continue."""
    name = signal.Signals(signum).name
    return (f"interrupted by {name}; {committed_note(out)} (the chunk being filled was dropped): run the same "
            "extract command with --resume to continue")
