"""zstd decoding bounded by the declared chunk and checked shard indexes, registered with zarr-python on
``import depthcache``.

A zstd frame states the size it decompresses to, and zarr's default codec allocates that much before checking
anything: a 64 KB frame declaring 1 TiB is a MemoryError, one expanding to 2 GiB costs 2 GiB. This codec (the same
``zstd`` codec on disk, so stores stay plain Zarr v3) reads the frame header first and refuses a frame that declares
more than a chunk of the array's declared shape and data type can hold; a frame that declares no size is decoded
into a buffer of exactly the chunk's size, which zstd cannot overrun. Failures are CorruptChunkError.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any

import numcodecs.zstd
import numpy as np
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import ShardingCodec, ZstdCodec
from zarr.codecs.sharding import MAX_UINT_64
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer
from zarr.core.config import config
from zarr.registry import register_codec

from depthcache.limits import MAX_CHUNK_BYTES, MAX_VARIABLE_CHUNK_BYTES, max_object_bytes

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
FCS_BYTES = {0: 0, 1: 2, 2: 4, 3: 8}  # Frame_Content_Size field size by its 2-bit flag (RFC 8878 3.1.1.1.1)
DICT_ID_BYTES = {0: 0, 1: 1, 2: 2, 3: 4}


class CorruptChunkError(ValueError):
    """A chunk's bytes cannot be what its array declares (bad frame, too large, checksum); the data is corrupt."""


def frame_content_size(frame: bytes | np.ndarray) -> int | None:
    """The decompressed size a zstd frame's header declares (None when the frame does not declare it)."""
    head = bytes(frame[:18])
    if len(head) < 6 or head[:4] != ZSTD_MAGIC:
        raise CorruptChunkError("chunk is not a zstd frame")
    descriptor = head[4]
    single_segment = bool(descriptor & 0x20)
    size_bytes = FCS_BYTES[descriptor >> 6] or (1 if single_segment else 0)
    if not size_bytes:
        return None
    start = 5 + (0 if single_segment else 1) + DICT_ID_BYTES[descriptor & 0x03]
    field = head[start:start + size_bytes]
    if len(field) != size_bytes:
        raise CorruptChunkError("zstd frame header is cut short")
    return int.from_bytes(field, "little") + (256 if size_bytes == 2 else 0)


def decoded_size(spec: ArraySpec) -> int | None:
    """Bytes of one chunk of ``spec`` after the array-to-bytes codec (None for variable-length data such as text)."""
    item_size = getattr(spec.dtype, "item_size", None)
    return None if item_size is None else math.prod(spec.shape) * int(item_size)


def bounded_decompress(frame: np.ndarray, exact: int | None) -> np.ndarray | bytes:
    """Decompress one zstd frame, allocating at most what a chunk of ``exact`` bytes (or a text chunk) may take."""
    declared = frame_content_size(frame)
    limit = MAX_VARIABLE_CHUNK_BYTES if exact is None else max_object_bytes(exact)
    if declared is not None and declared > limit:
        raise CorruptChunkError(f"zstd frame declares {declared} bytes, more than the {limit} a chunk of this "
                                "array can take")
    try:
        if declared is None:
            if exact is None:
                raise CorruptChunkError("zstd frame of a variable-length chunk does not declare its size")
            out = np.empty(exact, dtype=np.uint8)  # zstd stops with an error rather than write past its end
            numcodecs.zstd.decompress(frame, out)
            return out
        return numcodecs.zstd.decompress(frame)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, CorruptChunkError):
            raise
        raise CorruptChunkError(f"zstd: {exc}") from exc


class BoundedZstdCodec(ZstdCodec):
    """zarr's ``zstd`` codec whose decoding never allocates more than the declared chunk (see the module)."""

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        decoded = bounded_decompress(chunk_bytes.as_numpy_array(), decoded_size(chunk_spec))
        return chunk_spec.prototype.buffer.from_bytes(decoded)


def register_bounded_zstd() -> None:
    """Make zarr decode every ``zstd`` chunk with BoundedZstdCodec in this process; idempotent."""
    register_codec("zstd", BoundedZstdCodec)
    config.set({"codecs.zstd": f"{BoundedZstdCodec.__module__}.{BoundedZstdCodec.__qualname__}"})


INNER_LIMIT: ContextVar[int] = ContextVar("inner_limit", default=max_object_bytes(MAX_CHUNK_BYTES))


def index_entries_problem(entries: np.ndarray, inner_limit: int) -> str | None:
    """What is wrong with a shard index (``(..., 2)`` uint64 offsets and lengths), or None: an entry half empty, an
    inner chunk too short for its checksum or longer than a chunk of the array can be, or two overlapping."""
    flat = entries.reshape(-1, 2)
    empty = flat == MAX_UINT_64
    half = np.flatnonzero(empty[:, 0] != empty[:, 1])
    if half.size:
        return f"inner chunk {index_coords(entries, half[0])} has a half-empty index entry"
    used = np.flatnonzero(~empty[:, 0])
    offsets, lengths = flat[used, 0], flat[used, 1]
    bad = np.flatnonzero((lengths < 4) | (lengths > inner_limit) | (offsets > MAX_UINT_64 - lengths))
    if bad.size:
        return (f"inner chunk {index_coords(entries, used[bad[0]])} claims {int(lengths[bad[0]]):,} bytes at "
                f"offset {int(offsets[bad[0]]):,} (an inner chunk takes 4..{inner_limit:,})")
    order = np.argsort(offsets, kind="stable")
    overlap = np.flatnonzero(offsets[order][1:] < offsets[order][:-1] + lengths[order][:-1])
    if overlap.size:
        first, second = used[order[overlap[0]]], used[order[overlap[0] + 1]]
        return (f"inner chunks {index_coords(entries, first)} and {index_coords(entries, second)} overlap in the "
                "shard")
    return None


def index_coords(entries: np.ndarray, flat_index: int) -> tuple[int, ...]:
    """Inner chunk coordinates (within its shard) of entry ``flat_index`` of a shard index."""
    return tuple(int(i) for i in np.unravel_index(int(flat_index), entries.shape[:-1]))


def entry_past(entries: np.ndarray, data_bytes: int) -> tuple[int, ...] | None:
    """Coordinates of the first inner chunk a (checked) shard index places beyond the shard's ``data_bytes``."""
    flat = entries.reshape(-1, 2)
    past = np.flatnonzero((flat[:, 0] != MAX_UINT_64) & (flat[:, 0] + flat[:, 1] > data_bytes))
    return index_coords(entries, past[0]) if past.size else None


class ExactRanges:
    """A shard's byte getter that refuses a short read: a range past the end of the shard object, or a shard too
    short to hold its index (zarr would decode what it got)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.path = str(getattr(inner, "path", "shard"))

    async def get(self, prototype: Any, byte_range: Any = None) -> Buffer | None:
        value = await self.inner.get(prototype=prototype, byte_range=byte_range)
        if value is None:
            return None
        if isinstance(byte_range, RangeByteRequest) and len(value) != byte_range.end - byte_range.start:
            raise CorruptChunkError(f"{self.path}: the shard index points to bytes {byte_range.start:,}.."
                                    f"{byte_range.end:,}, past the end of the shard ({len(value):,} read)")
        if isinstance(byte_range, SuffixByteRequest) and len(value) != byte_range.suffix:
            raise CorruptChunkError(f"{self.path}: the shard is {len(value):,} bytes, too short for its index "
                                    f"({byte_range.suffix:,})")
        return value


class CheckedShardingCodec(ShardingCodec):
    """zarr's ``sharding_indexed`` codec that checks every shard index it reads before using it (see
    ``index_entries_problem``; the index's own crc32c first) and refuses reads past the shard, naming the shard
    and the inner chunk: failures are CorruptChunkError, in memory bounded by one inner chunk of the array."""

    async def _decode_single(self, shard_bytes: Buffer, shard_spec: ArraySpec) -> Any:
        token = INNER_LIMIT.set(self._inner_limit(shard_spec))
        try:
            return await super()._decode_single(shard_bytes, shard_spec)
        finally:
            INNER_LIMIT.reset(token)

    async def _decode_partial_single(self, byte_getter: Any, selection: Any, shard_spec: ArraySpec) -> Any:
        token = INNER_LIMIT.set(self._inner_limit(shard_spec))
        try:
            return await super()._decode_partial_single(ExactRanges(byte_getter), selection, shard_spec)
        finally:
            INNER_LIMIT.reset(token)

    def _inner_limit(self, shard_spec: ArraySpec) -> int:
        size = decoded_size(self._get_chunk_spec(shard_spec))
        return max_object_bytes(MAX_CHUNK_BYTES if size is None else size)

    async def _decode_shard_index(self, index_bytes: Buffer, chunks_per_shard: tuple[int, ...]) -> Any:
        expected = self._shard_index_size(chunks_per_shard)
        if len(index_bytes) != expected:
            raise CorruptChunkError(f"the shard index is cut short ({len(index_bytes):,} of {expected:,} bytes)")
        try:
            index = await super()._decode_shard_index(index_bytes, chunks_per_shard)
        except Exception as exc:  # noqa: BLE001 - the index's crc32c (or its decoding) failed: corrupt bytes
            raise CorruptChunkError(f"the shard index fails its checksum ({type(exc).__name__})") from exc
        problem = index_entries_problem(index.offsets_and_lengths, INNER_LIMIT.get())
        if problem:
            raise CorruptChunkError(f"the shard index is corrupt: {problem}")
        return index

    async def _load_shard_index_maybe(self, byte_getter: Any, chunks_per_shard: tuple[int, ...]) -> Any:
        try:
            return await super()._load_shard_index_maybe(byte_getter, chunks_per_shard)
        except CorruptChunkError as exc:
            raise CorruptChunkError(f"{getattr(byte_getter, 'path', 'shard')}: {exc}") from exc

    async def _load_full_shard_maybe(self, byte_getter: Any, prototype: Any, chunks_per_shard: tuple[int, ...]
                                     ) -> Any:
        path = getattr(byte_getter, "path", "shard")
        try:
            shard = await super()._load_full_shard_maybe(byte_getter, prototype, chunks_per_shard)
        except CorruptChunkError as exc:
            raise CorruptChunkError(f"{path}: {exc}") from exc
        if shard is not None:
            data_bytes = len(shard.buf) - self._shard_index_size(chunks_per_shard)
            past = entry_past(shard.index.offsets_and_lengths, data_bytes)
            if past is not None:
                raise CorruptChunkError(f"{path}: the shard index places inner chunk {past} past the end of the "
                                        f"shard's {data_bytes:,} data bytes")
        return shard


def register_checked_sharding() -> None:
    """Make zarr read every ``sharding_indexed`` array with CheckedShardingCodec in this process; idempotent."""
    register_codec("sharding_indexed", CheckedShardingCodec)
    config.set({"codecs.sharding_indexed":
                f"{CheckedShardingCodec.__module__}.{CheckedShardingCodec.__qualname__}"})
