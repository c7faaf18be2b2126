"""Copying a store between places (``depthcache push`` / ``pull``): parallel, resumable, verified by checksums.

Any two fsspec locations work (local folder, ``s3://``, ``gs://``, ...). Objects are copied in parallel; a chunk
already at the destination with the same size and the same trailing crc32c is skipped, so an interrupted copy
resumes where it stopped. Metadata (every ``zarr.json``) is always copied, and the root ``zarr.json``, which
holds the progress, is copied last: a half-copied store has no root metadata and never looks complete. At the
end every committed chunk of the destination is read back and checked against its crc32c
(``depthcache.schemas.validate_store``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from depthcache.errors import DepthcacheError
from depthcache.progress import MINUTE, Progress
from depthcache.store.io import is_url
from depthcache.store.layout import ATTRS_KEY

ROOT_METADATA = "zarr.json"
CRC_BYTES = 4  # crc32c is the last codec of every store array: a chunk's last 4 bytes are its checksum


@dataclass(frozen=True)
class Place:
    """One end of a copy: a filesystem and the store's root path on it."""

    fs: Any
    root: str

    def path(self, key: str) -> str:
        """Full path of the object ``key`` (relative to the store root)."""
        return f"{self.root}/{key}"


@dataclass(frozen=True)
class CopyReport:
    """What a copy did: objects copied and skipped, bytes moved, seconds taken, chunks verified."""

    copied: int
    skipped: int
    bytes_copied: int
    seconds: float
    problems: tuple[str, ...]


def place(location: str, storage_options: Mapping[str, Any] | None = None) -> Place:
    """The filesystem and root path of a local folder or fsspec URL (options apply to URLs only)."""
    options = dict(storage_options or {}) if is_url(location) else {}
    try:
        fs, root = fsspec.core.url_to_fs(str(location), **options)
    except (ImportError, ValueError, TypeError) as exc:
        raise DepthcacheError(f"cannot open {location}: {exc} (check the URL and --storage-option values)") from exc
    return Place(fs, root.rstrip("/"))


def listing(where: Place) -> dict[str, int]:
    """Relative key → size of every object under the store root ({} if it does not exist)."""
    where.fs.invalidate_cache()
    try:
        found = where.fs.find(where.root, detail=True)
    except FileNotFoundError:
        return {}
    prefix = where.root + "/"
    return {path.removeprefix(prefix): int(info["size"]) for path, info in found.items()
            if path.startswith(prefix) and info.get("type", "file") == "file"}


def is_temporary(key: str) -> bool:
    """Leftovers of interrupted local writes (``.name.tmp-…``, ``zarr.json.tmp``) are never copied."""
    return any(part.startswith(".") for part in key.split("/")) or key.endswith(".tmp")


def is_chunk(key: str) -> bool:
    """Chunks of stored arrays (immutable once written) as opposed to metadata or cached analysis results."""
    return "/c/" in f"/{key}" and not key.startswith("analyses/")


def same_object(src: Place, dst: Place, key: str, size: int, dst_sizes: dict[str, int]) -> bool:
    """True if the destination already holds this chunk: same size and same trailing crc32c."""
    if not is_chunk(key) or dst_sizes.get(key) != size or size < CRC_BYTES:
        return False
    tail = slice(size - CRC_BYTES, size)
    return (src.fs.cat_file(src.path(key), start=tail.start, end=tail.stop)
            == dst.fs.cat_file(dst.path(key), start=tail.start, end=tail.stop))


def copy_object(src: Place, dst: Place, key: str) -> int:
    """Copy one object (whole, through memory: chunks are at most tens of MiB); returns its size."""
    data = src.fs.cat_file(src.path(key))
    if isinstance(dst.fs, LocalFileSystem):
        dst.fs.makedirs(dst.path(key).rsplit("/", 1)[0], exist_ok=True)
    dst.fs.pipe_file(dst.path(key), data)
    return len(data)


def source_attrs(src: Place, location: str) -> dict[str, Any]:
    """The source store's depthcache attributes, refusing what is not a depthcache store."""
    import json

    try:
        meta = json.loads(src.fs.cat_file(src.path(ROOT_METADATA)))
    except FileNotFoundError as exc:
        raise DepthcacheError(f"no depthcache store at {location} (no {ROOT_METADATA})") from exc
    except ValueError as exc:
        raise DepthcacheError(f"{location}/{ROOT_METADATA} is not valid JSON") from exc
    attrs = meta.get("attributes", {}).get(ATTRS_KEY) if isinstance(meta, dict) else None
    if not isinstance(attrs, dict):
        raise DepthcacheError(f"{location} is not a depthcache store (no '{ATTRS_KEY}' attributes)")
    return attrs


def check_same_store(dst: Place, src_attrs: dict[str, Any], destination: str) -> None:
    """Refuse to copy over a different store (other model, data or creation time) at the destination."""
    import json

    try:
        meta = json.loads(dst.fs.cat_file(dst.path(ROOT_METADATA)))
    except FileNotFoundError:
        return
    except ValueError:
        meta = {}
    other = meta.get("attributes", {}).get(ATTRS_KEY) if isinstance(meta, dict) else None
    keys = ("created", "model", "dataset", "options", "layout")
    if not isinstance(other, dict) or any(other.get(k) != src_attrs.get(k) for k in keys):
        raise DepthcacheError(f"{destination} already holds a different store; remove it or choose another location")


def as_completed_sizes(pool: ThreadPoolExecutor, calls: list[Callable[[], int]]) -> Iterator[int]:
    """Run ``calls`` on ``pool``; yield each result as soon as it is done."""
    for future in as_completed([pool.submit(call) for call in calls]):
        yield future.result()


def copy_store(source: str, destination: str, source_options: Mapping[str, Any] | None = None,
               destination_options: Mapping[str, Any] | None = None, jobs: int = 8,
               verify: bool = True, progress: bool | None = False) -> CopyReport:
    """Copy a store object by object (parallel, resumable, root metadata last), then verify every chunk;
    ``progress`` as for every long command (False: silent, the library default)."""
    from depthcache.store.schema import validate_store

    started = time.perf_counter()
    src, dst = place(source, source_options), place(destination, destination_options)
    src_attrs = source_attrs(src, source)
    check_same_store(dst, src_attrs, destination)
    objects = {k: v for k, v in listing(src).items() if not is_temporary(k)}
    dst_sizes = listing(dst)
    keys = sorted(k for k in objects if k != ROOT_METADATA)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        present = dict(zip(keys, pool.map(lambda k: same_object(src, dst, k, objects[k], dst_sizes), keys)))
        todo = [k for k in keys if not present[k]]
        with Progress("copy", sum(objects[k] for k in todo) / 2**20, "MiB", progress, every=MINUTE) as bar:
            bar.note(f"{len(todo):,} objects to copy, {len(keys) - len(todo):,} already there")
            sizes = []
            for size in as_completed_sizes(pool, [lambda k=k: copy_object(src, dst, k) for k in todo]):
                sizes.append(size)
                bar.update(size / 2**20)
    sizes.append(copy_object(src, dst, ROOT_METADATA))
    arrived = listing(dst) if verify else {}
    problems = [f"{k} did not arrive whole" for k, size in sorted(objects.items()) if verify and arrived.get(k) != size]
    if verify and not problems:
        problems = validate_store(destination, read_chunks=True, storage_options=destination_options)
    return CopyReport(len(todo) + 1, len(keys) - len(todo), sum(sizes), time.perf_counter() - started,
                      tuple(problems))
