"""What a check finds in a store: problem lines (the first MAX_REPORTED_PROBLEMS kept, the rest counted), the
objects at fault (so a copy can fetch them again), notes that are not failures, and what was read."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from depthcache.limits import MAX_REPORTED_PROBLEMS

MAX_KEYS = 1_000_000  # objects at fault remembered for repair (a copy fetches the rest on its next run)
CHUNK_KEY = re.compile(r"(?P<array>.+?)/c/(?P<coords>\d+(?:/\d+)*)")


@dataclass
class Problems:
    """Problems found so far: text lines (bounded), their count, the keys of the objects at fault, and notes."""

    lines: list[str] = field(default_factory=list)
    count: int = 0
    keys: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=dict)

    def add(self, text: str, key: str | None = None) -> None:
        """Record one problem (and the object at fault, if one is)."""
        self.count += 1
        if len(self.lines) < MAX_REPORTED_PROBLEMS:
            self.lines.append(text)
        if key is not None and len(self.keys) < MAX_KEYS:
            self.keys.add(key)

    def note(self, text: str) -> None:
        """Record something worth saying that is not a failure (each once)."""
        if text not in self.notes:
            self.notes.append(text)

    def count_read(self, what: str, n: int = 1) -> None:
        """Count objects read and verified, by kind."""
        self.read[what] = self.read.get(what, 0) + n

    def __bool__(self) -> bool:
        return self.count > 0

    def report(self) -> list[str]:
        """The kept lines, plus one saying how many more there were."""
        more = self.count - len(self.lines)
        return self.lines + ([f"... and {more:,} more problems (not listed)"] if more else [])


def chunks_by_array(objects: Mapping[str, int]) -> dict[str, dict[tuple[int, ...], int]]:
    """Chunk objects of a listing grouped by array: array path → chunk grid coordinates → size."""
    grouped: dict[str, dict[tuple[int, ...], int]] = {}
    for key, size in objects.items():
        match = CHUNK_KEY.fullmatch(key)
        if match:
            coords = tuple(int(c) for c in match["coords"].split("/"))
            grouped.setdefault(match["array"], {})[coords] = size
    return grouped


def chunk_key(array: str, coords: tuple[int, ...]) -> str:
    """The object key of one chunk (default '/' chunk key encoding)."""
    return f"{array}/c/" + "/".join(map(str, coords))


def grid_coords(grid: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Every chunk coordinate of a grid in C order, produced lazily (costs nothing for the ones never asked for)."""
    if not all(grid):
        return
    coords = [0] * len(grid)
    while True:
        yield tuple(coords)
        axis = len(grid) - 1
        while axis >= 0 and coords[axis] + 1 == grid[axis]:
            coords[axis] = 0
            axis -= 1
        if axis < 0:
            return
        coords[axis] += 1


def first_missing(grid: tuple[int, ...], present: Mapping[tuple[int, ...], int], n: int) -> Iterator[tuple[int, ...]]:
    """Up to ``n`` chunk coordinates inside ``grid`` that are absent, in order (stops early: bounded by what
    exists plus ``n``)."""
    found = 0
    for coords in grid_coords(grid):
        if coords not in present:
            yield coords
            found += 1
            if found == n:
                return


def grid_problems(array: str, grid: tuple[int, ...], present: Mapping[tuple[int, ...], int], max_bytes: int,
                  problems: Problems, what: str = "chunk") -> None:
    """Chunks of ``array`` inside ``grid`` that are missing (they would read as zeros), larger than a chunk can
    take, or not regular files; the work is bounded by the chunks that exist."""
    inside = {c: s for c, s in present.items() if len(c) == len(grid) and all(i < g for i, g in zip(c, grid))}
    missing = math.prod(grid) - len(inside)
    if missing:
        shown = ", ".join(chunk_key(array, c) for c in first_missing(grid, inside, 3))
        problems.add(f"array {array!r}: {missing:,} of {math.prod(grid):,} {what}s are missing ({shown}"
                     f"{', ...' if missing > 3 else ''})")
        for coords in first_missing(grid, inside, min(missing, 1000)):
            problems.keys.add(chunk_key(array, coords))
    for coords, size in inside.items():
        if size < 0:
            problems.add(f"{chunk_key(array, coords)} is not a regular file", chunk_key(array, coords))
        elif size > max_bytes:
            problems.add(f"{chunk_key(array, coords)} is {size:,} bytes, more than a {what} of {array!r} can take "
                         f"({max_bytes:,})", chunk_key(array, coords))
