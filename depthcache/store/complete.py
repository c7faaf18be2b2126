"""Whether every chunk of a group's arrays exists: an absent chunk reads as the fill value (NaN or 0), so a cached
result missing one would be served as numbers nobody computed. Results are written with every chunk (even one of
fill values only), so absent always means damaged or unfinished."""

from __future__ import annotations

import zarr

from depthcache.store.io import object_listing
from depthcache.store.problems import Problems, chunk_key, chunks_by_array, first_missing

SCALAR_CHUNK = "c"  # the one chunk of a 0-d array (default chunk key encoding)


def missing_chunks(group: zarr.Group, limit: int = 3) -> list[str]:
    """Up to ``limit`` keys (relative to ``group``) of chunks its arrays' grids need but the store lacks, in array
    and grid order; the work is bounded by the chunks that exist plus ``limit``."""
    objects = object_listing(group)
    present = chunks_by_array(objects)
    missing: list[str] = []
    for name, array in sorted(group.arrays()):
        grid = tuple(array.cdata_shape)
        if grid:
            missing += [chunk_key(name, c) for c in first_missing(grid, present.get(name, {}), limit)]
        elif f"{name}/{SCALAR_CHUNK}" not in objects:
            missing.append(f"{name}/{SCALAR_CHUNK}")
        if len(missing) >= limit:
            break
    return missing[:limit]


def result_chunk_problems(where: str, group: zarr.Group, problems: Problems, advice: str) -> None:
    """Absent chunks of the cached result at ``where`` (e.g. 'analyses/contributions/KEY'), each with ``advice``."""
    for key in missing_chunks(group):
        problems.add(f"{where}/{key} is missing (the result is incomplete): {advice}", f"{where}/{key}")
