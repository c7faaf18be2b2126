"""Chunk buffers between the forward pass and the store: every chunk is written once, whole, then committed.

In schema 2.0 a chunk of tokens is one shard object of each layered array (one inner chunk per layer) and one inner
chunk of the longer shards of the other arrays (``resid_final``, per-token and top-k arrays), which zarr reads,
updates and replaces atomically (a temporary file renamed), so a kill leaves the previous shard intact.

bfloat16 arrays are opened as ``BFloat16Bits`` (depthcache.dtypes): the writer's buffers hold the uint16 bit
patterns that torch's bf16 tensors are, and zarr encodes them (bytes, zstd if any, crc32c) into exactly the chunk
files a bf16 array gives, without ml_dtypes (a second or more of start-up) ever being imported.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from depthcache.dtypes import is_bfloat16
from depthcache.errors import DepthcacheError
from depthcache.store.arrays import array_documents, holds_bits, open_array
from depthcache.store.io import fsync_path, local_root


def token_axis(array: zarr.Array) -> int:
    """Axis of the ``token`` dimension of a store array."""
    return array.metadata.dimension_names.index("token")


def along(axis: int, ndim: int, start: int, stop: int) -> tuple[slice, ...]:
    """Index selecting ``start:stop`` on ``axis`` and everything on the other axes."""
    index = [slice(None)] * ndim
    index[axis] = slice(start, stop)
    return tuple(index)


def object_file(array: zarr.Array, token: int) -> str:
    """Relative path of the object (the chunk, or in schema 2.0 the shard) holding ``token`` (default '/' keys)."""
    axis = token_axis(array)
    grid = ["0"] * array.ndim
    grid[axis] = str(token // array.metadata.chunk_grid.chunk_shape[axis])
    return "/".join(["c", *grid])


def fsync_chunk(array_folder: Path, key: str) -> None:
    """Make a written chunk file durable: its bytes, then every folder entry from the array folder down to it,
    so a committed chunk survives a power loss as well as a killed process."""
    path = array_folder / key
    fsync_path(path)
    for folder in path.relative_to(array_folder).parents:
        fsync_path(array_folder / folder)


def resume_point(committed: int, chunk_tokens: int, n_tokens: int) -> int:
    """Where writing continues: the last chunk boundary at or before ``committed`` (or the end), so a chunk is
    always written whole; a store whose progress stopped inside a chunk has that chunk rewritten."""
    return n_tokens if committed >= n_tokens else committed - committed % chunk_tokens


class ChunkWriter:
    """Accumulates token batches into chunk-sized buffers; writes each full chunk and then calls ``commit(stop)``.

    ``start`` must be a chunk boundary (a resume point); the buffers are reused so memory stays at one chunk
    per array whatever the dataset size. Only whole chunks (or the store's last, shorter one) are ever written
    and committed: tokens buffered when writing stops (an interrupt) are dropped, never flushed. ``names``: the
    arrays written (None: every array of ``group`` but ``layer``); a bf16 array's buffer holds uint16 bit patterns.
    """

    def __init__(self, group: zarr.Group, names: list[str] | None, chunk_tokens: int, n_tokens: int, start: int,
                 commit: Callable[[int], None], threads: int = 4) -> None:
        if start % chunk_tokens and start != n_tokens:
            raise ValueError(f"resume point {start} is not on a chunk boundary")
        documents = array_documents(group)
        names = [n for n in documents if n != "layer"] if names is None else names
        # every chunk written even if it equals the fill value, so a committed chunk always exists
        self.arrays = {name: open_array(group, name, documents[name], {"write_empty_chunks": True}) for name in names}
        self.chunk_tokens, self.n_tokens, self.commit = chunk_tokens, n_tokens, commit
        self.chunk_start, self.filled = start, 0
        self.buffers = {name: np.empty(self._buffer_shape(a), dtype=a.dtype) for name, a in self.arrays.items()}
        self.folder = local_root(group)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="depthcache-write")
        self.bytes_written = 0

    def _buffer_shape(self, array: zarr.Array) -> tuple[int, ...]:
        shape = list(array.shape)
        shape[token_axis(array)] = min(self.chunk_tokens, self.n_tokens)
        return tuple(shape)

    def append(self, batch: dict[str, np.ndarray], at: int) -> None:
        """Add tokens starting at token ``at`` (each array's token axis as in the store), flushing full chunks.

        ``at`` continues the previous batch, or jumps to a chunk boundary once the buffered chunk is flushed
        (a worker writing its shards).
        """
        if at != self.chunk_start + self.filled:
            if self.filled or at % self.chunk_tokens:
                raise ValueError(f"tokens at {at} do not continue the chunk buffered at {self.chunk_start}")
            self.chunk_start = at
        n = len(batch["token_id"])
        offset = 0
        while offset < n:
            take = min(self.chunk_tokens - self.filled, n - offset)
            for name, values in batch.items():
                axis = token_axis(self.arrays[name])
                self.buffers[name][along(axis, values.ndim, self.filled, self.filled + take)] = \
                    self._stored(name, values)[along(axis, values.ndim, offset, offset + take)]
            self.filled += take
            offset += take
            if self.filled == self.chunk_tokens or self.chunk_start + self.filled == self.n_tokens:
                self.flush()

    def _stored(self, name: str, values: np.ndarray) -> np.ndarray:
        """``values`` as array ``name`` holds them: a bf16 array takes uint16 bit patterns or ml_dtypes bfloat16
        (viewed as its bits); anything else would be cast by value, so it is refused."""
        if not holds_bits(self.arrays[name]) or values.dtype == np.uint16:
            return values
        if is_bfloat16(values.dtype):
            return values.view(np.uint16)
        raise TypeError(f"{name} is bfloat16: give its values as uint16 bit patterns (or ml_dtypes bfloat16), "
                        f"not {values.dtype}")

    def flush(self) -> None:
        """Write the buffered chunk of every array (full, or the store's last), make it durable, then commit."""
        stop = self.chunk_start + self.filled
        if self.filled != self.chunk_tokens and stop != self.n_tokens:
            raise RuntimeError(f"refusing to commit a partly filled chunk (tokens {self.chunk_start}..{stop})")
        try:
            list(self.pool.map(lambda name: self._write(name, stop), self.arrays))
            self.commit(stop)
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            raise DepthcacheError(
                f"{'disk full' if full else exc.strerror or exc} while writing tokens {self.chunk_start}..{stop}; "
                f"the first {self.chunk_start:,} tokens are committed and intact: "
                f"{'free space' if full else 'fix that'} and rerun with --resume") from exc
        self.bytes_written += sum(b[along(token_axis(self.arrays[n]), b.ndim, 0, self.filled)].nbytes
                                  for n, b in self.buffers.items())
        self.chunk_start, self.filled = stop, 0

    def _write(self, name: str, stop: int) -> None:
        """Write one array's buffered chunk: a whole object, or (2.0 arrays without a layer dim) the chunk's part of
        a longer shard, which zarr reads, updates and replaces atomically."""
        array, buffer = self.arrays[name], self.buffers[name]
        axis = token_axis(array)
        array[along(axis, array.ndim, self.chunk_start, stop)] = buffer[along(axis, array.ndim, 0, self.filled)]
        if self.folder is not None:
            fsync_chunk(self.folder / name, object_file(array, self.chunk_start))

    def finish(self) -> None:
        """Check that the batches ended on a chunk boundary (a partly filled chunk would be silently lost)."""
        if self.filled:
            raise RuntimeError(f"the batches ended inside the chunk starting at token {self.chunk_start}")

    def close(self) -> None:
        """Stop the write threads."""
        self.pool.shutdown(wait=True)
