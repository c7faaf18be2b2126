"""Files a write killed midway leaves in a local store: zarr writes every object to ``NAME.<32 hex digits>.partial``
beside it (``c/0/3/0.<uuid>.partial``, ``zarr.<uuid>.partial``) and renames it into place, and ``write_attrs`` goes
through ``zarr.json.tmp``; kill -9 or a hang-up in between leaves the temporary file (a whole chunk or shard,
megabytes). A resume removes them, validate reports them. Folders whose name starts with '.' belong to a writer
that may still be running (a cached result being written) and are left to it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from depthcache.store.io import local_listing
from depthcache.store.problems import Problems

LEFTOVER = re.compile(r"[^/]*\.[0-9a-f]{32}\.partial|zarr\.json\.tmp")


def leftover_keys(keys: Iterable[str]) -> list[str]:
    """The keys of a listing that are temporary files of interrupted writes (outside hidden folders), sorted."""
    return sorted(key for key in keys if LEFTOVER.fullmatch(key.rsplit("/", 1)[-1])
                  and not any(part.startswith(".") for part in key.split("/")[:-1]))


def remove_leftovers(folder: str | Path, writers: int = 1) -> int:
    """Remove the temporary files of interrupted writes under a local store before it is written again; nothing
    when several writers share it (another one may be mid-write). Returns how many were removed."""
    if writers > 1:
        return 0
    keys = leftover_keys(local_listing(Path(folder)))
    for key in keys:
        (Path(folder) / key).unlink(missing_ok=True)
    return len(keys)


def leftover_problems(objects: Mapping[str, int], problems: Problems) -> None:
    """Report the temporary files of interrupted writes in a store's listing (one line, the first few named)."""
    keys = leftover_keys(objects)
    if keys:
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        size = sum(max(objects[k], 0) for k in keys)
        problems.add(f"{len(keys):,} temporary file(s) of interrupted writes ({shown}; {size / 2**20:,.1f} MiB): "
                     "run the same extract command with --resume, which removes them, or delete them")
