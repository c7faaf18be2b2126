"""What an erase/igrad run has finished so far, in ``OUT.partial``: one file per (item, layer), so an interrupted
run continues with ``--resume`` where it stopped and the map equals an uninterrupted run's.

``OUT.partial/job.json`` records everything the numbers depend on (model weights, prompts, layers, options,
reference mean, device); a resume with anything else is refused. Each finished layer is written to a temporary
file renamed into place, so a kill leaves whole files only. The folder is removed once the map is written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from depthcache.errors import DepthcacheError

JOB_FILE = "job.json"


def partial_path(out: str) -> Path:
    """The folder holding an unfinished run of the map ``out``."""
    here = Path(out.rstrip("/"))
    return here.with_name(here.name + ".partial")


def canonical(identity: dict[str, Any]) -> str:
    """The identity as sorted JSON (what job.json holds and resumes are compared by)."""
    return json.dumps(identity, sort_keys=True, default=str, indent=1)


class Partial:
    """The finished layers of one run of the map ``out``, identified by ``identity``."""

    def __init__(self, out: str, identity: dict[str, Any], resume: bool) -> None:
        self.folder, self.identity = partial_path(out), canonical(identity)
        if self.folder.exists() and not resume:
            raise DepthcacheError(f"{self.folder} holds an interrupted run of {out}: continue it with --resume, or "
                                  "delete it to start over")
        if self.folder.exists() and (self.folder / JOB_FILE).is_file() and \
                (self.folder / JOB_FILE).read_text() != self.identity:
            raise DepthcacheError(f"{self.folder} was started with other options, model or prompts than these "
                                  f"(see {self.folder / JOB_FILE}): rerun with those, or delete it to start over")

    def piece(self, item: int, layer: int) -> Path:
        """The file of one finished (item, layer)."""
        return self.folder / f"item{item:05d}-layer{layer:04d}.npz"

    def count(self) -> int:
        """Finished (item, layer) pieces so far."""
        return len(list(self.folder.glob("item*-layer*.npz"))) if self.folder.is_dir() else 0

    def get(self, item: int, layer: int) -> dict[str, np.ndarray] | None:
        """The saved arrays of a finished (item, layer), or None."""
        path = self.piece(item, layer)
        if not path.is_file():
            return None
        with np.load(path) as data:
            return {key: data[key] for key in data.files}

    def put(self, item: int, layer: int, arrays: dict[str, np.ndarray]) -> None:
        """Save a finished (item, layer) whole: a temporary file renamed into place."""
        if not (self.folder / JOB_FILE).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = self.folder / f".{JOB_FILE}.tmp"
            temporary.write_text(self.identity)
            os.replace(temporary, self.folder / JOB_FILE)
        path = self.piece(item, layer)
        temporary = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, path)

    def through(self, item: int) -> Callable[[int, Callable[[], dict[str, np.ndarray]]], dict[str, np.ndarray]]:
        """For item ``item``: ``(layer, compute)`` → the saved arrays of that layer, else ``compute()`` saved."""
        def lookup(layer: int, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
            found = self.get(item, layer)
            if found is None:
                found = compute()
                self.put(item, layer, found)
            return found
        return lookup

    def remove(self) -> None:
        """Delete the folder (the map is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
