"""zstd decoding bounded by the declared chunk, registered with zarr-python on ``import depthcache``.

A zstd frame states the size it decompresses to, and zarr's default codec allocates that much before checking
anything: a 64 KB frame declaring 1 TiB is a MemoryError, one expanding to 2 GiB costs 2 GiB. This codec (the same
``zstd`` codec on disk, so stores stay plain Zarr v3) reads the frame header first and refuses a frame that declares
more than a chunk of the array's declared shape and data type can hold; a frame that declares no size is decoded
into a buffer of exactly the chunk's size, which zstd cannot overrun. Failures are CorruptChunkError.
"""

from __future__ import annotations

import math

import numcodecs.zstd
import numpy as np
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer
from zarr.core.config import config
from zarr.registry import register_codec

from depthcache.limits import MAX_VARIABLE_CHUNK_BYTES, max_object_bytes

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
