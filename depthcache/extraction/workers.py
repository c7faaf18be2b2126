"""Several extraction workers into one store: deterministic disjoint shards, per-worker progress, finalize.

Worker i of N owns shards s with s % N == i; a shard is a run of whole chunks, so every chunk has exactly one
writer. Each worker commits its own progress in ``progress/worker_<i>`` (never the root), so workers never
write the same file; the root progress is set once every worker has finished.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import zarr

from depthcache.errors import DepthcacheError
from depthcache.store.io import read_attrs, write_attrs
from depthcache.store.layout import layout_units

PROGRESS_GROUP = "progress"


@dataclass(frozen=True)
class Worker:
    """This process's place among the extraction workers."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise DepthcacheError(f"--worker-index must be in 0..{self.count - 1} (got {self.index}) "
                                  f"and --num-workers at least 1 (got {self.count})")


def worker_from_env(env: dict[str, str] | None = None) -> Worker:
    """The worker given by torchrun (RANK/WORLD_SIZE) or Slurm (array task or task id), else a single worker."""
    env = dict(os.environ if env is None else env)
    for index, count in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                         ("SLURM_PROCID", "SLURM_NTASKS")):
        if index in env and count in env:
            try:
                return Worker(int(env[index]), int(env[count]))
            except ValueError as exc:
                raise DepthcacheError(f"cannot read the worker from ${index}/${count}: {exc}") from exc
    return Worker()


def shard_units(unit_tokens: int, batch_tokens: int) -> int:
    """Units (chunks; token shards in 2.0 stores) per worker shard: enough that a shard spans ~8 batches, so
    batches shared by two shards cost little."""
    return max(1, -(-8 * batch_tokens // unit_tokens))


def segments(worker: Worker, n_tokens: int, unit_tokens: int, batch_tokens: int, done_until: int
             ) -> list[tuple[int, int]]:
    """Token ranges [start, stop) this worker still has to write, in increasing order: whole units of
    ``unit_tokens`` (``layout_units``), so no stored object has two writers."""
    if worker.count == 1:
        return [(done_until, n_tokens)] if done_until < n_tokens else []
    shard = shard_units(unit_tokens, batch_tokens) * unit_tokens
    ranges = [(s, min(s + shard, n_tokens)) for s in range(worker.index * shard, n_tokens, worker.count * shard)]
    return [(max(a, done_until), b) for a, b in ranges if b > done_until]


def progress_group(root: zarr.Group, worker: Worker) -> zarr.Group:
    """The group holding one worker's progress (created on first use)."""
    return root.require_group(f"{PROGRESS_GROUP}/worker_{worker.index}")


def worker_done_until(root: zarr.Group, worker: Worker) -> int:
    """Token before which every token this worker owns is committed (0 if it has not started)."""
    if worker.count == 1:
        return int(read_attrs(root)["progress"]["tokens_committed"])
    try:
        return int(root[f"{PROGRESS_GROUP}/worker_{worker.index}"].attrs["depthcache"]["tokens_committed_until"])
    except KeyError:
        return 0


def commit_worker(root: zarr.Group, worker: Worker, stop: int) -> None:
    """Record that this worker's tokens before ``stop`` are durable."""
    write_attrs(progress_group(root, worker), {"tokens_committed_until": stop, "num_workers": worker.count})


def batch_tokens(attrs: dict[str, Any]) -> int:
    """Tokens in one forward batch of the store's extraction (sets the shard size)."""
    return int(attrs["options"]["batch_size"]) * int(attrs["options"]["seq_len"])


def unfinished_workers(root: zarr.Group, attrs: dict[str, Any], count: int) -> list[int]:
    """Indices of the workers that still have tokens to write."""
    n, (_, unit) = int(attrs["layout"]["n_tokens"]), layout_units(attrs["layout"])
    return [i for i in range(count)
            if segments(Worker(i, count), n, unit, batch_tokens(attrs), worker_done_until(root, Worker(i, count)))]


def finalize(root: zarr.Group, attrs: dict[str, Any], count: int) -> dict[str, Any]:
    """Mark the store complete once every worker is done; refuse (saying who is missing) otherwise."""
    missing = unfinished_workers(root, attrs, count)
    if missing:
        raise DepthcacheError(f"workers {', '.join(map(str, missing))} of {count} have not finished: "
                              "run them (with the same options) before finalizing")
    attrs["progress"] = {"tokens_committed": int(attrs["layout"]["n_tokens"]), "complete": True}
    write_attrs(root, attrs)
    return attrs
