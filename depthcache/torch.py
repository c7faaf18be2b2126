"""Stored activations streamed into PyTorch training: ``ActivationDataset(STORE, site="resid_pre", layers=[...])``.

An ``IterableDataset`` over the committed tokens of a store. Its unit of work is the store's chunk (a range of
``chunk_tokens`` tokens, all layers): the chunk list is permuted per epoch (``shuffle=True``), dealt out to
distributed ranks and then DataLoader workers (so every token is read exactly once per epoch), read a few chunks
at a time into a shuffle buffer whose rows are permuted before they are yielded. The next buffer is read in a
background thread while the current one is consumed. Rows come as float32 (or, with ``dtype=torch.bfloat16``,
bf16 without a copy-convert) torch tensors with the token's metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from zarr.core.buffer.cpu import NDBuffer

from depthcache.errors import DepthcacheError
from depthcache.store.io import open_group
from depthcache.store.layout import TASK_ARRAYS
from depthcache.store.reader import Store

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_final")
METADATA = ("token_id", "doc_id", "position", "next_token_id") + tuple(TASK_ARRAYS)
ROW_BATCH = 256  # rows are cut from batches of this size when no batch_size is given


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


class ActivationDataset(torch.utils.data.IterableDataset):
    """A store's activations of one site (and chosen layers) as rows for PyTorch, streamed chunk by chunk.

    Each item is a dict: ``activations`` (``(len(layers), d_model)``, or ``(d_model,)`` for one int layer or
    ``resid_final``), ``token`` (the token's index in the store) and the per-token metadata (token_id, doc_id,
    position, next_token_id, and item/answer_index/hops in task stores). With ``batch_size`` the dataset yields
    ready batches (use ``DataLoader(ds, batch_size=None)``), much faster than collating rows one by one."""

    def __init__(self, store: str | os.PathLike[str], site: str = "resid_pre",
                 layers: int | Sequence[int] | None = None, *, dtype: torch.dtype = torch.float32,
                 batch_size: int | None = None, shuffle: bool = False, buffer_chunks: int = 4, seed: int = 0,
                 drop_last: bool = False, run: str | None = None, rank: int | None = None,
                 world_size: int | None = None, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if site not in SITES:
            raise DepthcacheError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise DepthcacheError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        for name, value in (("batch_size", batch_size), ("buffer_chunks", buffer_chunks)):
            if value is not None and value < 1:
                raise DepthcacheError(f"{name} must be at least 1")
        opened = Store(str(store), dict(storage_options or {}))
        self.location, self.run, self.storage_options = str(store), run, dict(storage_options or {})
        ds = opened.run(run) if run else opened.ds
        if site not in ds:
            raise DepthcacheError(f"{store} has no {site}: extract it with --sites including "
                                  f"{'resid' if site.startswith('resid') else site.split('_')[0]}")
        attrs = opened.attrs if run is None else ds.attrs["depthcache"]
        self.site, self.dtype, self.batch_size, self.shuffle = site, dtype, batch_size, shuffle
        self.buffer_chunks, self.seed, self.drop_last, self.epoch = buffer_chunks, seed, drop_last, 0
        self.stored_dtype = attrs["options"]["dtype"]
        self.chunk_tokens = int(attrs["layout"]["chunk_tokens"])
        self.n_tokens = int(attrs["progress"]["tokens_committed"])
        self.metadata = tuple(name for name in METADATA if name in ds)
        self.layer_index, self.squeeze = self._layer_index(ds, site, layers)
        self.layers = [int(ds["layer"].values[i]) for i in self.layer_index] if self.layer_index else []
        self.layer_tensor = torch.tensor(self.layer_index, dtype=torch.int64)
        self.d_model = int(ds[site].sizes["d_model"])
        self.rank, self.world_size = rank, world_size

    @staticmethod
    def _layer_index(ds: Any, site: str, layers: int | Sequence[int] | None) -> tuple[list[int], bool]:
        """Positions in the store's layer axis of the requested model layers, and whether to drop the layer axis."""
        if site == "resid_final":
            if layers is not None:
                raise DepthcacheError("resid_final has no layers: drop layers=")
            return [], True
        stored = [int(v) for v in ds["layer"].values]
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
        group = open_group(self.location, "r", path=f"runs/{self.run}" if self.run else None,
                           storage_options=self.storage_options)
        return {name: group[name] for name in (self.site, *self.metadata)}

    def read_buffer(self, arrays: dict[str, zarr.Array], chunks: Sequence[int], rng: np.random.Generator
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Several chunks decoded straight into one buffer, as stored (``(layers, tokens, d_model)``, bf16 stays
        bf16), with their metadata columns, and the order to yield its rows in (None: as stored)."""
        spans = [self._chunk_range(c) for c in chunks]
        n = sum(stop - start for start, stop in spans)
        array = arrays[self.site]
        layered = self.site != "resid_final"
        buffer = np.empty((array.shape[0], n, self.d_model) if layered else (n, self.d_model), dtype=array.dtype)
        columns: dict[str, list[np.ndarray]] = {name: [] for name in self.metadata}
        at = 0
        for start, stop in spans:
            target = buffer[:, at:at + stop - start] if layered else buffer[at:at + stop - start]
            region = (slice(None), slice(start, stop)) if layered else (slice(start, stop),)
            array.get_basic_selection(region, out=NDBuffer.from_numpy_array(target))  # decoded in place
            for name in self.metadata:
                columns[name].append(arrays[name][start:stop])
            at += stop - start
        rows = {"raw": as_tensor(buffer, self.stored_dtype),
                "token": torch.from_numpy(np.concatenate([np.arange(a, b) for a, b in spans]))}
        rows |= {name: torch.from_numpy(np.concatenate(parts).astype(np.int64)) for name, parts in columns.items()}
        return rows, torch.from_numpy(rng.permutation(n)) if self.shuffle else None

    def take(self, rows: dict[str, torch.Tensor], index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """The rows ``index`` of a buffer: activations gathered (``index_select``: contiguous d_model rows), put
        token-major and cast to ``dtype`` in one copy, metadata alongside."""
        raw = rows["raw"]
        axis = 0 if self.site == "resid_final" else 1
        picked = raw[(slice(None),) * axis + (index,)] if isinstance(index, slice) else raw.index_select(axis, index)
        if axis:
            if len(self.layer_index) < raw.shape[0]:
                picked = picked.index_select(0, self.layer_tensor)
            picked = picked[0] if self.squeeze else picked.permute(1, 0, 2)
        out = torch.empty(picked.shape, dtype=self.dtype)
        out.copy_(picked)
        return {"activations": out, **{key: value[index] for key, value in rows.items() if key != "raw"}}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = Shard(info.id, info.num_workers) if info is not None else Shard()
        rank, world = self._rank()
        mine = shard_chunks(chunk_order(self.n_chunks, self.shuffle, self.seed, self.epoch), Shard(rank, world),
                            worker)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker.index])
        groups = [mine[i:i + self.buffer_chunks] for i in range(0, len(mine), self.buffer_chunks)]
        batches = self._batches(self._buffers(groups, rng), self.batch_size or ROW_BATCH)
        if self.batch_size is not None:
            yield from batches
            return
        for batch in batches:
            yield from ({key: value[i] for key, value in batch.items()} for i in range(len(batch["token"])))

    def _buffers(self, groups: list[np.ndarray], rng: np.random.Generator
                 ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """The shuffle buffers in order, each read in a background thread while the one before is consumed."""
        if not groups:
            return
        arrays = self._arrays()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="depthcache-read") as pool:
            pending = pool.submit(self.read_buffer, arrays, groups[0], rng)
            for nxt in groups[1:]:
                done = pending.result()
                pending = pool.submit(self.read_buffer, arrays, nxt, rng)
                yield done
            yield pending.result()

    def _batches(self, buffers: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]], size: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``size`` rows in each buffer's order, continuing across buffers; the last one partial unless
        ``drop_last``."""
        carry: dict[str, torch.Tensor] | None = None
        for rows, order in buffers:
            n = len(rows["token"])
            begin = 0
            if carry is not None:
                begin = min(size - len(carry["token"]), n)
                head = self.take(rows, order[:begin] if order is not None else slice(0, begin))
                carry = {key: torch.cat([carry[key], head[key]]) for key in carry}
                if len(carry["token"]) < size:
                    continue
                yield carry
                carry = None
            full = begin + (n - begin) // size * size
            for at in range(begin, full, size):
                yield self.take(rows, order[at:at + size] if order is not None else slice(at, at + size))
            if full < n:
                carry = self.take(rows, order[full:] if order is not None else slice(full, n))
        if carry is not None and not (self.drop_last and self.batch_size is not None):
            yield carry


def as_tensor(values: np.ndarray, stored_dtype: str) -> torch.Tensor:
    """A numpy buffer as a torch tensor without copying (bf16 bits reinterpreted)."""
    if stored_dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)
