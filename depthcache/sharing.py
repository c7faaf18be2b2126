"""Copying a store between places (``depthcache push`` / ``pull``): parallel, resumable, verified by checksums.

Any two fsspec locations work (local folder, ``s3://``, ``gs://``, ...). Objects are copied in parallel; a chunk
already at the destination with the same size and the same trailing crc32c (a 2.0 shard: the same index and the
same trailing crc32c of every inner chunk) is skipped, so an interrupted copy resumes where it stopped. Metadata (every ``zarr.json``) is always copied, and the root ``zarr.json``, which
holds the progress, is copied last: a half-copied store has no root metadata and never looks complete. At the
end the destination is validated as ``depthcache validate`` does (every committed chunk, the model head, the
tokenizer files and cached analyses decoded and checked); every object at fault is fetched again from the source
and checked again, so a damaged copy is repaired by the same run (a chunk skipped because its size and trailer
matched, but whose middle was damaged, included). Source keys that cannot be store keys (empty or '.'/'..' parts,
backslashes) are never copied, and no source object larger than any store object may be is read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from depthcache.errors import DepthcacheError
from depthcache.limits import MAX_CHUNK_BYTES, MAX_METADATA_BYTES, max_object_bytes
from depthcache.progress import MINUTE, Progress
from depthcache.store.io import is_access_failure, is_url, one_line, parse_json, reaching
from depthcache.store.layout import ATTRS_KEY, is_checksummed, shard_index_bytes
from depthcache.store.problems import CHUNK_KEY

ROOT_METADATA = "zarr.json"
CRC_BYTES = 4  # crc32c is the last codec of every store array: a chunk's last 4 bytes are its checksum
COPY_PIECE = 16 * 2**20  # objects larger than this (2.0 shards) are copied piece by piece (S3 parts of 16 MiB)


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
    """What a copy did: objects copied and skipped, bytes moved, seconds taken, what the verification read,
    objects repaired, source keys ignored, problems left and notes."""

    copied: int
    skipped: int
    bytes_copied: int
    seconds: float
    problems: tuple[str, ...]
    verified: str = ""
    repaired: int = 0
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    source_damaged: bool = False  # the problems left are the source's: everything at fault was fetched again


def place(location: str, storage_options: Mapping[str, Any] | None = None) -> Place:
    """The filesystem and root path of a local folder or fsspec URL (options apply to URLs only)."""
    options = dict(storage_options or {}) if is_url(location) else {}
    try:
        fs, root = fsspec.core.url_to_fs(str(location), **options)
    except (ImportError, ValueError, TypeError) as exc:
        raise DepthcacheError(f"cannot open {location}: {exc} (check the URL and --storage-option values)") from exc
    return Place(fs, root.rstrip("/"))


def bucket(location: str) -> str | None:
    """'s3://bucket' of a URL (its first path component after the protocol); None for local folders."""
    if not is_url(location):
        return None
    protocol, _, rest = str(location).partition("://")
    return f"{protocol}://{rest.split('/', 1)[0]}"


def require_bucket(where: Place, location: str) -> None:
    """Refuse, in one line, a URL whose bucket does not exist (or cannot be seen with these credentials)."""
    name = bucket(location)
    if name is None:
        return
    try:
        where.fs.info(name.partition("://")[2])  # not fs.exists: s3fs's takes a refused connection for 'no bucket'
    except FileNotFoundError as exc:
        how = f" (e.g. aws s3 mb {name})" if name.startswith("s3://") else ""
        raise DepthcacheError(f"the bucket {name} does not exist (or these credentials cannot see it): create it "
                              f"first{how}, or name an existing bucket") from exc


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
    """Leftovers of interrupted local writes (``.name.tmp-…``, ``zarr.json.tmp``, zarr's ``*.partial``) are never
    copied."""
    return any(part.startswith(".") for part in key.split("/")) or key.endswith((".tmp", ".partial"))


def is_store_key(key: str) -> bool:
    """True for a key that can name an object of a store: '/'-separated non-empty parts, none '.' or '..', no
    backslash or control character (so a copy can never write outside its destination)."""
    parts = key.split("/")
    return (all(parts) and not any(part in (".", "..") for part in parts) and "\\" not in key
            and all(ord(c) >= 32 for c in key))


def oversized(key: str, size: int) -> bool:
    """True for an object larger than any store object may be (metadata, or the largest chunk the limits allow)."""
    limit = MAX_METADATA_BYTES if key.rsplit("/", 1)[-1] == ROOT_METADATA else max_object_bytes(MAX_CHUNK_BYTES)
    return size > limit


def is_chunk(key: str) -> bool:
    """Chunks of stored arrays (immutable once written) as opposed to metadata or cached analysis results."""
    return "/c/" in f"/{key}" and not key.startswith("analyses/")


def checksummed_arrays(src: Place, objects: Mapping[str, int], jobs: int) -> dict[str, int]:
    """The source's arrays whose objects can be compared without reading them, by path: codecs ending with crc32c
    (0: an object's last 4 bytes are its checksum), or sharded (2.0) with crc32c on every inner chunk and on the
    index (the index's size in bytes). A model head of schema < 1.3 has no checksum: its chunks are always copied."""
    metadata = [k for k in objects if k.endswith(f"/{ROOT_METADATA}")]

    def comparable(key: str) -> int | None:
        try:
            meta = parse_json(src.fs.cat_file(src.path(key)), key)
        except DepthcacheError:
            return None
        if not isinstance(meta, dict) or meta.get("node_type") != "array":
            return None
        return 0 if is_checksummed(meta.get("codecs")) else shard_index_bytes(meta)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        found = list(pool.map(comparable, metadata))
    return {key.removesuffix(f"/{ROOT_METADATA}"): n for key, n in zip(metadata, found) if n is not None}


def same_object(src: Place, dst: Place, key: str, size: int, dst_sizes: dict[str, int], checksummed: dict[str, int]
                ) -> bool:
    """True if the destination already holds this object of a checksummed array: same size and same trailing
    crc32c, or for a shard the same index and the same crc32c at the end of every inner chunk (the final
    verification fetches it again if its middle differs)."""
    match = CHUNK_KEY.fullmatch(key)
    if (not is_chunk(key) or match is None or match["array"] not in checksummed or dst_sizes.get(key) != size
            or size < CRC_BYTES):
        return False
    index_bytes = checksummed[match["array"]]
    if index_bytes:
        mine = shard_fingerprint(src, key, size, index_bytes)
        return mine is not None and mine == shard_fingerprint(dst, key, size, index_bytes)
    tail = slice(size - CRC_BYTES, size)
    return (src.fs.cat_file(src.path(key), start=tail.start, end=tail.stop)
            == dst.fs.cat_file(dst.path(key), start=tail.start, end=tail.stop))


def shard_fingerprint(where: Place, key: str, size: int, index_bytes: int) -> bytes | None:
    """A shard's index followed by the crc32c trailer of every inner chunk it lists (one ranged read each), or None
    when the index points outside the shard (never the same as anything: the shard is copied)."""
    if size < index_bytes:
        return None
    path = where.path(key)
    index = where.fs.cat_file(path, start=size - index_bytes, end=size)
    entries = np.frombuffer(index[:-CRC_BYTES], dtype="<u8").reshape(-1, 2)
    used = entries[entries[:, 0] != np.iinfo(np.uint64).max]
    ends = used[:, 0] + used[:, 1]
    if len(used) and ((used[:, 1] < CRC_BYTES).any() or (ends > size - index_bytes).any()):
        return None
    trailers = where.fs.cat_ranges([path] * len(ends), [int(e) - CRC_BYTES for e in ends], [int(e) for e in ends])
    return bytes(index) + b"".join(trailers)


def copy_object(src: Place, dst: Place, key: str) -> int:
    """Copy one object; returns its size. Objects up to COPY_PIECE go whole through memory, larger ones (2.0 shards,
    up to 1 GiB) in pieces of COPY_PIECE, so memory stays at one piece per copy job."""
    path = src.path(key)
    if isinstance(dst.fs, LocalFileSystem):
        dst.fs.makedirs(dst.path(key).rsplit("/", 1)[0], exist_ok=True)
    with src.fs.open(path, "rb", block_size=COPY_PIECE) as reader:
        first = reader.read(COPY_PIECE)
        if len(first) < COPY_PIECE:
            dst.fs.pipe_file(dst.path(key), first)
            return len(first)
        copied = len(first)
        with dst.fs.open(dst.path(key), "wb", block_size=COPY_PIECE) as writer:
            while first:
                writer.write(first)
                first = reader.read(COPY_PIECE)
                copied += len(first)
    return copied


def source_attrs(src: Place, location: str, size: int | None) -> dict[str, Any]:
    """The source store's depthcache attributes, refusing what is not a depthcache store (size checked first)."""
    if size is None:
        raise DepthcacheError(f"no depthcache store at {location} (no {ROOT_METADATA})")
    if size > MAX_METADATA_BYTES:
        raise DepthcacheError(f"{location}/{ROOT_METADATA} is {size:,} bytes, more than store metadata may take")
    meta = parse_json(src.fs.cat_file(src.path(ROOT_METADATA)), f"{location}/{ROOT_METADATA}")
    attrs = meta.get("attributes", {}).get(ATTRS_KEY) if isinstance(meta, dict) else None
    if not isinstance(attrs, dict):
        raise DepthcacheError(f"{location} is not a depthcache store (no '{ATTRS_KEY}' attributes)")
    return attrs


def check_same_store(dst: Place, src_attrs: dict[str, Any], destination: str) -> None:
    """Refuse to copy over a different store (other model, data or creation time) at the destination."""
    try:
        meta = parse_json(dst.fs.cat_file(dst.path(ROOT_METADATA)), f"{destination}/{ROOT_METADATA}")
    except FileNotFoundError:
        return
    except DepthcacheError:
        meta = {}
    other = meta.get("attributes", {}).get(ATTRS_KEY) if isinstance(meta, dict) else None
    keys = ("created", "model", "dataset", "options", "layout")
    if not isinstance(other, dict) or any(other.get(k) != src_attrs.get(k) for k in keys):
        raise DepthcacheError(f"{destination} already holds a different store; remove it or choose another location")


def source_objects(src: Place, location: str) -> tuple[dict[str, int], tuple[str, ...]]:
    """The source's objects to copy (key → size) and the keys ignored because they cannot be store keys;
    refuses a source holding an object larger than any store object may be."""
    objects, ignored = {}, []
    for key, size in listing(src).items():
        if is_temporary(key):
            continue
        if not is_store_key(key):
            ignored.append(key)
            continue
        if oversized(key, size):
            raise DepthcacheError(f"{location}/{key} is {size:,} bytes, more than any store object may be: the "
                                  "source is damaged or not a depthcache store")
        objects[key] = size
    return objects, tuple(sorted(ignored))


def copy_all(src: Place, dst: Place, keys: Iterable[str], jobs: int, bar: Progress | None = None) -> list[int]:
    """Copy objects in parallel, advancing ``bar`` (MiB) as each arrives; returns their sizes."""
    sizes = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in as_completed([pool.submit(copy_object, src, dst, k) for k in keys]):
            sizes.append(future.result())
            if bar is not None:
                bar.update(sizes[-1] / 2**20)
    return sizes


def verification(destination: str, objects: Mapping[str, int], dst: Place, options: Mapping[str, Any] | None
                 ) -> tuple[Any, bool]:
    """The destination checked as ``depthcache validate`` does, and whether every object arrived whole (when
    some did not, only they are reported)."""
    from depthcache.store.problems import Problems
    from depthcache.store.schema import validate

    arrived = listing(dst)
    short = sorted(k for k, size in objects.items() if arrived.get(k) != size)
    if short:
        found = Problems()
        for key in short:
            found.add(f"{key} did not arrive whole", key)
        return found, False
    return validate(destination, read_chunks=True, storage_options=options), True


def copy_store(source: str, destination: str, source_options: Mapping[str, Any] | None = None,
               destination_options: Mapping[str, Any] | None = None, jobs: int = 8,
               verify: bool = True, progress: bool | None = False) -> CopyReport:
    """Copy a store object by object (parallel, resumable, root metadata last), then verify everything and fetch
    again whatever fails verification (repairing a damaged copy in the same run); ``progress`` as for every long
    command (False: silent, the library default)."""
    from depthcache.store.schema import verified

    started = time.perf_counter()
    src, dst = place(source, source_options), place(destination, destination_options)
    with reaching(source):
        require_bucket(src, source)
        objects, ignored = source_objects(src, source)
        src_attrs = source_attrs(src, source, objects.get(ROOT_METADATA))
    with reaching(destination):
        require_bucket(dst, destination)
        check_same_store(dst, src_attrs, destination)
        dst_sizes = listing(dst)
    keys = sorted(k for k in objects if k != ROOT_METADATA)
    try:
        checksummed = checksummed_arrays(src, objects, jobs) if dst_sizes else {}
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            present = dict(zip(keys, pool.map(lambda k: same_object(src, dst, k, objects[k], dst_sizes, checksummed),
                                              keys)))
        todo = [k for k in keys if not present[k]]
        with Progress("copy", sum(objects[k] for k in todo) / 2**20, "MiB", progress, every=MINUTE) as bar:
            bar.note(f"{len(todo):,} objects to copy, {len(keys) - len(todo):,} already there")
            sizes = copy_all(src, dst, todo, jobs, bar) + [copy_object(src, dst, ROOT_METADATA)]
        if not verify:
            return CopyReport(len(todo) + 1, len(keys) - len(todo), sum(sizes), time.perf_counter() - started, (),
                              ignored=ignored)
        found, whole = verification(destination, objects, dst, destination_options)
        refetch = sorted(k for k in found.keys if k in objects)
        if refetch:  # fetch what failed again (e.g. a chunk damaged at the destination), then check everything again
            sizes += copy_all(src, dst, refetch, jobs)
            found, whole = verification(destination, objects, dst, destination_options)
    except Exception as exc:
        if not is_access_failure(exc):
            raise
        raise DepthcacheError(f"copying {source} to {destination} stopped: {one_line(exc)}; fix the cause and run the "
                              "same command again (it resumes)") from exc
    return CopyReport(len(todo) + 1, len(keys) - len(todo), sum(sizes), time.perf_counter() - started,
                      tuple(found.report()), verified(found), len(refetch), ignored, tuple(found.notes),
                      source_damaged=bool(found) and whole)
