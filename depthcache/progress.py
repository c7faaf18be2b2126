"""Progress of long jobs: a bar with ETA on a terminal; elsewhere (a log, a pipe, a batch job) one line on stderr
per step, or per minute for fine-grained units; nothing with ``--no-progress``.

``enabled``: None (the default of every command) picks the bar on a terminal and lines elsewhere, True forces the
bar, False silences both. Every long command uses this one class, so their output reads the same.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

from tqdm import tqdm

MINUTE = 60.0


def mode(enabled: bool | None, stream: TextIO) -> str:
    """'bar', 'lines' or 'off' for an ``enabled`` setting on ``stream``."""
    if enabled is False:
        return "off"
    if enabled is True:
        return "bar"
    return "bar" if stream.isatty() else "lines"


def duration(seconds: float) -> str:
    """Seconds as '45s', '3m05s' or '2h07m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def amount(value: float) -> str:
    """A count as an integer with thousands separators when whole, else with one decimal."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


class Progress:
    """Progress over ``total`` units of ``unit`` (None: unknown) of a job named ``desc``, ``done`` of them already
    finished (a resumed job: they count towards the position, not towards the rate behind the ETA).

    Lines are written at the start, at most every ``every`` seconds (0: at every update) and at the end; ``note``
    adds what the current step is doing (shown in the bar, and in a line when a minute passed without one). A
    ``quiet`` job writes no line before its first ``every`` seconds have passed, and then none at the end either
    unless it wrote one (analyses: most finish in seconds)."""

    def __init__(self, desc: str, total: float | None, unit: str = "step", enabled: bool | None = None,
                 done: float = 0, every: float = 0.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, quiet: bool = False) -> None:
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.stream = stream or sys.stderr
        self.mode = mode(enabled, self.stream)
        self.clock, self.started, self.initial, self.done = clock, clock(), done, done
        self.last_line, self.extra, self.printed, self.quiet = self.started, "", None, quiet
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream,
                        unit_scale=unit == "tok", disable=self.mode != "bar")
        if self.mode == "lines" and not quiet:
            self.line()

    def eta(self) -> float | None:
        """Seconds left at this run's rate so far (None before the first unit or with an unknown total)."""
        rate = (self.done - self.initial) / max(self.clock() - self.started, 1e-9)
        return None if self.total is None or rate <= 0 else (self.total - self.done) / rate

    def text(self) -> str:
        """The line describing where the job stands."""
        where = f"{amount(self.done)}/{amount(self.total)} {self.unit}" if self.total is not None else \
            f"{amount(self.done)} {self.unit}"
        if self.total:
            where += f" ({100 * self.done / self.total:.0f}%)"
        eta = self.eta()
        timing = f"{duration(self.clock() - self.started)} elapsed" + (f", ETA {duration(eta)}" if eta is not None
                                                                      and self.done < (self.total or 0) else "")
        return f"{self.desc}: {where}, {timing}" + (f"; {self.extra}" if self.extra else "")

    def line(self) -> None:
        """Write the current line (line mode)."""
        print(self.text(), file=self.stream, flush=True)
        self.last_line, self.printed = self.clock(), self.done

    def update(self, n: float = 1) -> None:
        """``n`` more units done."""
        self.done += n
        self.bar.update(n)
        if self.mode == "lines" and self.clock() - self.last_line >= self.every:
            self.line()

    def note(self, text: str) -> None:
        """What the current step is doing; in line mode written when a minute passed without a line."""
        self.extra = text
        self.bar.set_postfix_str(text)
        if self.mode == "lines" and self.clock() - self.last_line >= max(self.every, MINUTE):
            self.line()

    def set_total(self, total: float) -> None:
        """The total, once it is known (or when it changes)."""
        self.total = total
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        """Finish: the bar closes; line mode writes a last line unless the last one already showed the end."""
        self.bar.close()
        if self.mode == "lines" and self.printed != self.done and not (self.quiet and self.printed is None):
            self.extra = ""
            self.line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- analyses: the CLI says whether progress is shown; library calls stay silent by default -----------------------

_AMBIENT: ContextVar[bool | None] = ContextVar("depthcache_progress", default=False)
_STAGE: ContextVar[Progress | None] = ContextVar("depthcache_progress_stage", default=None)


@contextmanager
def shown(enabled: bool | None) -> Iterator[None]:
    """Within this block, ``stage`` and ``dask_progress`` report progress per ``enabled`` (outside: silent)."""
    token = _AMBIENT.set(enabled)
    try:
        yield
    finally:
        _AMBIENT.reset(token)


@contextmanager
def stage(desc: str, total: float, unit: str, every: float = MINUTE) -> Iterator[Progress]:
    """A Progress under the ``shown`` setting for an analysis that counts its own units with ``advance`` (dask
    tasks go unreported meanwhile, so the output is not doubled)."""
    with Progress(desc, total, unit, _AMBIENT.get(), every=every, quiet=True) as bar:
        token = _STAGE.set(bar)
        try:
            yield bar
        finally:
            _STAGE.reset(token)


def advance(n: float = 1) -> None:
    """``n`` more units of the current ``stage`` done (nothing outside one)."""
    bar = _STAGE.get()
    if bar is not None:
        bar.update(n)


@contextmanager
def dask_progress(desc: str) -> Iterator[None]:
    """Report the tasks of the dask computations in this block (local schedulers) under the ``shown`` setting."""
    if _AMBIENT.get() is False:
        yield
        return
    from dask.callbacks import Callback

    bar = Progress(desc, None, "tasks", _AMBIENT.get(), every=MINUTE, quiet=True)

    class Tasks(Callback):
        """Adds each computation's tasks to the total and counts them as they finish."""

        def _start_state(self, dsk: Any, state: Any) -> None:
            if _STAGE.get() is None:
                bar.set_total((bar.total or 0) + sum(len(state[k]) for k in ("ready", "waiting", "running")))

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if _STAGE.get() is None:
                bar.update()

    try:
        with Tasks():
            yield
    finally:
        bar.close()
