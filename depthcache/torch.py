"""Stored activations streamed into PyTorch training: ``ActivationDataset(STORE, site="resid_pre", layers=[...])``.

An ``IterableDataset`` over the committed tokens of a store. Its unit of work is the store's chunk (a range of
``chunk_tokens`` tokens, all layers): the chunk list is permuted per epoch (``shuffle=True``), dealt out to
distributed ranks and then DataLoader workers (so every token is read exactly once per epoch), read a few chunks
at a time into a shuffle buffer whose rows are permuted before they are yielded. The next buffer is read in a
background thread while the current one is consumed.

Where the time goes, and why it is laid out this way (benchmarks/README.md has the measurements): zarr decodes
each chunk into an array of its own and then copies it into the caller's output (``out[selection] = chunk``). That
copy, which a plain ``array[:, chunk]`` read makes too, does all the work here: its output is a token-major view of
the shuffle buffer in the output dtype (the transposition to ``(token, layer, d_model)`` and the bf16 -> float32
cast come with it), and with ``shuffle`` it is a ``ScatterRows`` that sends each token to its shuffled row. The
rows are then in yield order, and batches are views of the buffer: no gather, no per-batch copy. Large arrays are
numpy's, wrapped with ``torch.from_numpy``: fresh torch allocations of tens of MB (``clone``, ``index_select``)
measured several times slower than numpy's on the 2-core VM.

The bf16 -> float32 cast stays ml_dtypes' (plain assignment). Widening by bit pattern instead (the bf16 bits
shifted into the high half of each float32) was measured in this copy and was not faster: per 512-token chunk of 30
layers, 8.6 ms for the cast, 9.2 ms for a per-row ``np.left_shift(..., dtype=uint32, out=row)``, 13 ms for
writing the uint16 halves, 17 ms via a uint32 temporary. The transposed or scattered write is the cost, not the
cast (the shift beats the cast only in a contiguous copy: 6.0 ms against 8.4). What float32 pays beyond bf16 is
writing twice the bytes, and the page faults of its fresh buffers: 26-280 ms to first-touch a 141 MB buffer on
the loaded VM.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer

from depthcache.dtypes import BFLOAT16
from depthcache.errors import DepthcacheError
from depthcache.store.io import open_group
from depthcache.store.layout import TASK_ARRAYS, absent_roles, is_part
from depthcache.store.schema import check_store

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_final")
METADATA = ("token_id", "doc_id", "position", "next_token_id") + tuple(TASK_ARRAYS)
ROW_BATCH = 256  # rows are cut from batches of this size when no batch_size is given
BUFFER_BYTES = 256 * 2**20  # default shuffle buffer (buffer_chunks whole chunks of the chosen layers, output dtype)
NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16), torch.bfloat16: BFLOAT16}


@dataclass(frozen=True)
class Shard:
    """Which chunks one reader (a rank's worker) takes: every ``count``-th chunk from ``index``."""

    index: int = 0
    count: int = 1


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when it is initialised, else of $RANK/$WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def chunk_order(n_chunks: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's chunk order: the same permutation on every rank and worker (seeded by seed and epoch)."""
    if not shuffle:
        return np.arange(n_chunks)
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


def shard_chunks(order: np.ndarray, rank: Shard, worker: Shard) -> np.ndarray:
    """This reader's chunks: the rank's share of the order, then the worker's share of that (disjoint, covering)."""
    return order[rank.index::rank.count][worker.index::worker.count]


def layer_selection(index: Sequence[int]) -> slice | np.ndarray:
    """The store's layer positions as a slice when they are evenly spaced and increasing (zarr copies a slice of
    the decoded chunk straight into the buffer), else as an integer array (zarr gathers them first)."""
    if len(index) == 1:
        return slice(index[0], index[0] + 1)
    step = index[1] - index[0]
    if step > 0 and all(b - a == step for a, b in zip(index, index[1:])):
        return slice(index[0], index[-1] + 1, step)
    return np.asarray(index, dtype=np.int64)


def merged_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted token ranges with adjacent ones joined (one zarr call reads a run of chunks, decoding concurrently)."""
    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, made as the DataLoader's own collate does in a worker: sending a
    view of it to the main process passes a handle, not a copy of the batch."""
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=dtype).new(storage).resize_(*shape)


def concatenate(head: np.ndarray | torch.Tensor, tail: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Two columns' rows joined (numpy, or torch for shared-memory activations)."""
    return torch.cat([head, tail]) if isinstance(head, torch.Tensor) else np.concatenate([head, tail])


class BufferPool:
    """Shuffle buffers for reuse once nothing references them (no batch view left): a fresh array of 100+ MB is
    page-faulted in, 4 KiB at a time, on its first write, which measured as costly as reading a chunk uncompressed."""

    def __init__(self, keep: int = 2) -> None:
        self.buffers: list[np.ndarray] = []
        self.keep, self.allocated = keep, 0

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer of this shape and dtype: a free one of the pool, else a new one (kept in place of the oldest)."""
        for buffer in self.buffers:  # a free buffer is referenced by the list, ``buffer`` and getrefcount only
            if buffer.shape == shape and buffer.dtype == dtype and sys.getrefcount(buffer) == 3:
                return buffer
        buffer = np.empty(shape, dtype)
        self.buffers, self.allocated = [buffer, *self.buffers][:self.keep], self.allocated + 1
        return buffer


class ScatterRows(NDBuffer):
    """zarr's output buffer for one chunk that sends each token's values to a chosen row of a token-major buffer.

    zarr copies every decoded chunk into its output with ``out[selection] = chunk``; this ``__setitem__`` writes
    the same values to ``buffer[rows[token]]`` instead, so the shuffle costs nothing beyond that copy. ``written``
    counts the values it received: a zarr that bypassed ``__setitem__`` is detected and the reader falls back."""

    def __init__(self, shape_of: np.ndarray, buffer: np.ndarray, rows: np.ndarray, token_axis: int) -> None:
        super().__init__(shape_of)
        self.buffer, self.rows, self.token_axis, self.written = buffer, rows, token_axis, 0

    def __setitem__(self, key: Any, value: Any) -> None:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != self._data.ndim or not all(isinstance(part, slice) for part in key):
            return  # not a selection this maps (``written`` stays short: the reader falls back)
        if isinstance(value, NDBuffer):
            value = value.as_numpy_array()
        values = np.moveaxis(np.broadcast_to(value, self._data[key].shape), self.token_axis, 0)
        rows = self.rows[key[self.token_axis]]
        self.buffer[(rows, *key[:self.token_axis], *key[self.token_axis + 1:])] = values
        self.written += values.size


class ActivationDataset(torch.utils.data.IterableDataset):
    """A store's activations of one site (and chosen layers) as rows for PyTorch, streamed chunk by chunk.

    Each item is a dict: ``activations`` (``(len(layers), d_model)``, or ``(d_model,)`` for one int layer or
    ``resid_final``), ``token`` (the token's index in the store) and the per-token metadata (token_id, doc_id,
    position, next_token_id, and item/answer_index/hops in task stores). With ``batch_size`` the dataset yields
    ready batches (use ``DataLoader(ds, batch_size=None)``), much faster than collating rows one by one. A batch's
    tensors are views of its shuffle buffer (disjoint slices, no copy): keeping one keeps the whole buffer."""

    def __init__(self, store: str | os.PathLike[str], site: str = "resid_pre",
                 layers: int | Sequence[int] | None = None, *, dtype: torch.dtype = torch.float32,
                 batch_size: int | None = None, shuffle: bool = False, buffer_chunks: int | None = None, seed: int = 0,
                 drop_last: bool = False, run: str | None = None, rank: int | None = None,
                 world_size: int | None = None, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if site not in SITES and not is_part(site):
            raise DepthcacheError(f"unknown site {site!r}; choose from {', '.join(SITES)} or a stored part_<module>")
        if dtype not in NUMPY_DTYPE:
            raise DepthcacheError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        for name, value in (("batch_size", batch_size), ("buffer_chunks", buffer_chunks)):
            if value is not None and value < 1:
                raise DepthcacheError(f"{name} must be at least 1")
        self.location, self.run, self.storage_options = str(store), run, dict(storage_options or {})
        group = self._group()
        attrs = check_store(group)  # the checked reader's check, without building an xarray dataset
        if site not in group and site.split("_")[0] in absent_roles(attrs):
            raise DepthcacheError(f"{store} has no {site}: its model ({attrs['model']['structure']['class_name']}) "
                                  f"has no {site.split('_')[0]} branch, so what it adds there is zero")
        if site not in group:
            raise DepthcacheError(f"{store} has no {site}: extract it with --sites including "
                                  f"{'resid' if site.startswith('resid') else 'parts' if is_part(site) else site.split('_')[0]}")
        self.site, self.dtype, self.batch_size, self.shuffle = site, dtype, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0
        self.stored_dtype = attrs["options"]["dtype"]
        self.chunk_tokens = int(attrs["layout"]["chunk_tokens"])
        self.n_tokens = int(attrs["progress"]["tokens_committed"])
        self.metadata = tuple(name for name in METADATA if name in group)
        stored = [int(v) for v in group["layer"][:]] if site != "resid_final" else []
        self.layer_index, self.squeeze = self._layer_index(stored, site, layers)
        self.layers = [stored[i] for i in self.layer_index]
        self.d_model = int(group[site].shape[-1])
        row_bytes = max(1, len(self.layers)) * self.d_model * torch.tensor([], dtype=dtype).element_size()
        self.buffer_chunks = buffer_chunks or max(1, BUFFER_BYTES // (self.chunk_tokens * row_bytes))
        # shuffle inside zarr's copy; not for unsorted layers (zarr then writes with integer arrays)
        self.scatter = self.layer_index == sorted(self.layer_index)
        self.rank, self.world_size = rank, world_size

    def _group(self) -> zarr.Group:
        """The store's group (or its run's), opened read-only in the current process."""
        if self.run is None:
            return open_group(self.location, "r", storage_options=self.storage_options)
        root = open_group(self.location, "r", storage_options=self.storage_options)
        runs = sorted(root["runs"].group_keys()) if "runs" in root else []
        if self.run not in runs:
            raise DepthcacheError(f"{self.location} has no run {self.run!r}; runs: {', '.join(runs) or 'none'}")
        return open_group(self.location, "r", path=f"runs/{self.run}", storage_options=self.storage_options)

    @staticmethod
    def _layer_index(stored: list[int], site: str, layers: int | Sequence[int] | None) -> tuple[list[int], bool]:
        """Positions in the store's layer axis of the requested model layers, and whether to drop the layer axis."""
        if site == "resid_final":
            if layers is not None:
                raise DepthcacheError("resid_final has no layers: drop layers=")
            return [], True
        wanted = stored if layers is None else [layers] if isinstance(layers, int) else list(layers)
        missing = [layer for layer in wanted if layer not in stored]
        if missing or not wanted:
            raise DepthcacheError(f"layers {missing or wanted} are not stored; the store holds layers {stored}")
        return [stored.index(layer) for layer in wanted], isinstance(layers, int)

    def set_epoch(self, epoch: int) -> None:
        """Use a new chunk and row order (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    @property
    def n_chunks(self) -> int:
        """Committed chunks of the store."""
        return -(-self.n_tokens // self.chunk_tokens)

    def rows(self) -> int:
        """Rows this rank yields per epoch over all its workers (before batching)."""
        rank, world = self._rank()
        chunks = shard_chunks(np.arange(self.n_chunks), Shard(rank, world), Shard())
        return sum(self._chunk_range(c)[1] - self._chunk_range(c)[0] for c in chunks)

    def _rank(self) -> tuple[int, int]:
        """(rank, world size): as given, else from torch.distributed or the environment."""
        rank, world = distributed_rank()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        if not 0 <= rank < world:
            raise DepthcacheError(f"rank {rank} is outside a world of {world}")
        return rank, world

    def _chunk_range(self, chunk: int) -> tuple[int, int]:
        """Token range [start, stop) of a chunk, cut at the committed tokens."""
        start = int(chunk) * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def _arrays(self) -> dict[str, zarr.Array]:
        """The zarr arrays this reader needs, opened in the current process (after a DataLoader fork)."""
        group = self._group()
        return {name: group[name] for name in (self.site, *self.metadata)}

    def read_buffer(self, arrays: dict[str, zarr.Array], chunks: Sequence[int], rng: np.random.Generator,
                    pool: BufferPool | None = None) -> dict[str, Any]:
        """Several chunks decoded into one token-major buffer in the output dtype (``(tokens, layers, d_model)``,
        or ``(tokens, d_model)`` for resid_final), rows already in the order to yield them (shuffled when
        ``shuffle``), with the metadata columns in the same order. zarr's copy of each decoded chunk into the
        buffer does the transposition, the cast and the shuffle (``ScatterRows``): no pass of its own."""
        spans = merged_spans(sorted(self._chunk_range(c) for c in chunks))
        n = sum(stop - start for start, stop in spans)
        positions = rng.permutation(n) if self.shuffle else None  # buffer row of the i-th token read
        layered = self.site != "resid_final"
        shape = (n, len(self.layer_index), self.d_model) if layered else (n, self.d_model)
        shared = shared_tensor(shape, self.dtype) if torch.utils.data.get_worker_info() is not None else None
        if shared is not None:  # a DataLoader worker: batches go to the main process as views, not copies
            buffer = shared.view(torch.int16).numpy().view(BFLOAT16) if self.dtype == torch.bfloat16 else shared.numpy()
        else:
            pool = pool or BufferPool()
            buffer = pool.get(shape, NUMPY_DTYPE[self.dtype])
        if positions is not None and self.scatter:
            if self._read_into(arrays[self.site], buffer, spans, positions):
                order = None  # rows were written in yield order
            else:  # this zarr did not write every chunk through NDBuffer.__setitem__: read in place, gather
                self.scatter = False
                self._read_into(arrays[self.site], buffer, spans, None)
                order = np.argsort(positions)
        else:
            self._read_into(arrays[self.site], buffer, spans, None)
            order = None if positions is None else np.argsort(positions)
        activations = buffer.take(order, axis=0) if order is not None else shared if shared is not None else buffer
        rows: dict[str, np.ndarray | torch.Tensor] = {"activations": activations}
        tokens = np.concatenate([np.arange(a, b) for a, b in spans])
        columns = {"token": tokens}  # one zarr call per column (its chunks read concurrently), not one per chunk
        columns |= {name: (arrays[name][spans[0][0]:spans[0][1]] if len(spans) == 1 else
                           arrays[name].get_orthogonal_selection(tokens)).astype(np.int64) for name in self.metadata}
        for name, column in columns.items():
            if positions is None:
                rows[name] = column
            elif order is None:
                rows[name] = np.empty_like(column)
                rows[name][positions] = column
            else:
                rows[name] = column[order]
        return rows

    def _read_into(self, array: zarr.Array, buffer: np.ndarray, spans: list[tuple[int, int]],
                   positions: np.ndarray | None) -> bool:
        """Decode the spans' chunks into ``buffer``: in place, or each token's row to ``positions``. False when
        zarr wrote some chunk without going through ``NDBuffer.__setitem__`` (the scatter is then incomplete)."""
        layered = self.site != "resid_final"
        layer = layer_selection(self.layer_index) if layered else None
        at = 0
        for start, stop in spans:
            target = buffer[at:at + stop - start]
            target = target.transpose(1, 0, 2) if layered else target  # zarr's (layer, token, d_model) order
            out = (NDBuffer.from_numpy_array(target) if positions is None else
                   ScatterRows(target, buffer, positions[at:at + stop - start], token_axis=1 if layered else 0))
            if layered:
                array.get_orthogonal_selection((layer, slice(start, stop), slice(None)), out=out)
            else:
                array.get_basic_selection((slice(start, stop),), out=out)
            if positions is not None and out.written != target.size:
                return False
            at += stop - start
        return True

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = Shard(info.id, info.num_workers) if info is not None else Shard()
        rank, world = self._rank()
        mine = shard_chunks(chunk_order(self.n_chunks, self.shuffle, self.seed, self.epoch), Shard(rank, world),
                            worker)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker.index])
        groups = [mine[i:i + self.buffer_chunks] for i in range(0, len(mine), self.buffer_chunks)]
        batches = (self.as_tensors(batch) for batch in self._stream(groups, rng, self.batch_size or ROW_BATCH))
        if self.batch_size is not None:
            yield from batches
            return
        for batch in batches:
            yield from ({key: value[i] for key, value in batch.items()} for i in range(len(batch["token"])))

    def as_tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A batch of numpy columns as torch tensors sharing their memory (bf16 bits reinterpreted)."""
        values = batch["activations"]
        if self.squeeze and values.ndim == 3:
            values = values[:, 0]
        if isinstance(values, np.ndarray):
            values = (torch.from_numpy(values.view(np.int16)).view(torch.bfloat16) if values.dtype == BFLOAT16
                      else torch.from_numpy(values))
        return {"activations": values, **{k: torch.from_numpy(v) for k, v in batch.items() if k != "activations"}}

    def _stream(self, groups: list[np.ndarray], rng: np.random.Generator, size: int
                ) -> Iterator[dict[str, np.ndarray | torch.Tensor]]:
        """Batches of ``size`` rows, views of the shuffle buffers (whose rows are in yield order), continuing across
        buffers; the last one partial unless ``drop_last``. Each buffer is read in a background thread, started
        once the consumer has taken the first batch of the buffer before it: by then the buffer before that has
        no batch left in use (unless the consumer keeps them), so the pool hands it back instead of a fresh one."""
        if not groups:
            return
        arrays, buffers = self._arrays(), BufferPool(keep=2)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="depthcache-read") as reader:
            pending = reader.submit(self.read_buffer, arrays, groups[0], rng, buffers)
            carry: dict[str, Any] | None = None
            for following in [*groups[1:], None]:
                rows = pending.result()
                batches, carry = cut(rows, carry, size)
                del rows
                started = False
                while batches:
                    yield batches.pop()
                    if not started and following is not None:
                        pending, started = reader.submit(self.read_buffer, arrays, following, rng, buffers), True
                if not started and following is not None:
                    pending = reader.submit(self.read_buffer, arrays, following, rng, buffers)
        if carry is not None and not (self.drop_last and self.batch_size is not None):
            yield carry


def cut(rows: dict[str, Any], carry: dict[str, Any] | None, size: int
        ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A buffer's batches of ``size`` rows (views, the first one completing ``carry``, the rows left over from the
    buffers before), last first (to be popped), and the rows left over now."""
    n = len(rows["token"])
    begin, batches = 0, []
    if carry is not None:
        begin = min(size - len(carry["token"]), n)
        carry = {key: concatenate(carry[key], rows[key][:begin]) for key in carry}
        if len(carry["token"]) < size:
            return [], carry
        batches.append(carry)
    full = begin + (n - begin) // size * size
    batches += [{key: value[at:at + size] for key, value in rows.items()} for at in range(begin, full, size)]
    return batches[::-1], {key: value[full:] for key, value in rows.items()} if full < n else None
