"""An extraction's options checked against the model, the store limits and this machine, before anything is
created: a refused run leaves nothing behind, and a store is never written that its own readers would refuse."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from depthcache.errors import DepthcacheError
from depthcache.limits import MAX_METADATA_BYTES
from depthcache.model import LoadedModel, Placement, load_model, resolve_device, weight_bytes, weights_folder
from depthcache.model.placement import HOST_SHARE, parse_max_memory
from depthcache.store.schema import check_attrs, chunking_problems

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
COMPRESSION_AT_BEST = {"bfloat16": 1.5, "float16": 1.0, "float32": 1.0}  # f16/f32 activations are stored raw
GIB = 2**30


@dataclass(frozen=True)
class Sizes:
    """What one extraction processes: tokens, stored layers, widths and option values that size its buffers."""

    n_tokens: int
    remaining: int  # tokens still to write (all of them for a new store)
    n_layers: int  # stored layers
    d_model: int
    vocab: int
    sites: int  # activation arrays per stored layer (resid_pre, attn_out, mlp_out)
    final: int  # 1 when resid_final is stored
    itemsize: int
    chunk_tokens: int
    seq_len: int
    batch_size: int
    top_k: int
    queue_batches: int


def context_length(config: Any) -> int | None:
    """The longest input the model's config allows (None when the config does not say)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_model_options(seq_len: int, top_k: int, vocab: int, config: Any) -> None:
    """--seq-len within the model's context and --top-k within its vocabulary."""
    if top_k > vocab:
        raise DepthcacheError(f"--top-k {top_k} exceeds the model's vocabulary of {vocab:,} tokens")
    longest = context_length(config)
    if longest is not None and seq_len > longest:
        raise DepthcacheError(f"--seq-len {seq_len:,} exceeds the model's context of {longest:,} positions "
                              "(max_position_embeddings): choose at most that")


def check_chunking(sizes: Sizes) -> None:
    """--chunk-tokens within the limits every reader enforces (chunk count and bytes), with what to do."""
    problems = chunking_problems(sizes.n_tokens, sizes.chunk_tokens, sizes.n_layers, sizes.d_model, sizes.itemsize)
    if problems:
        raise DepthcacheError(f"--chunk-tokens {sizes.chunk_tokens}: {problems[0]}; choose a "
                              f"{'smaller' if 'GiB' in problems[0] else 'larger'} --chunk-tokens (or leave it out)")


def check_store_attrs(attrs: dict[str, Any]) -> None:
    """The attributes about to be written pass the readers' own schema and size checks."""
    size = len(json.dumps(attrs, default=str))
    if size > MAX_METADATA_BYTES:
        raise DepthcacheError(f"this extraction's provenance would take {size:,} bytes of metadata, more than the "
                              f"{MAX_METADATA_BYTES:,} a store may hold (a task's items are recorded there): use "
                              "fewer items")
    try:
        check_attrs(attrs)
    except DepthcacheError as exc:
        raise DepthcacheError(f"refusing to create a store its readers would refuse: {exc}") from exc


def batch_bytes(s: Sizes) -> int:
    """A lower bound on the memory one forward batch needs: float32 logits twice (the model's, the float copy
    for log-softmax) and the captured activations of every stored layer and site."""
    return s.batch_size * s.seq_len * (2 * 4 * s.vocab + activation_bytes(s))


def activation_bytes(s: Sizes) -> int:
    """Activation bytes stored per token."""
    return (s.n_layers * s.sites + s.final) * s.d_model * s.itemsize


def host_bytes(s: Sizes) -> int:
    """A lower bound on the host memory of the writer: one chunk buffer per array, plus the queued batches."""
    per_token = activation_bytes(s) + 8 * s.top_k + 40  # top-k ids and log-probs, ten int32/float32 per token
    return per_token * (min(s.chunk_tokens, s.n_tokens) + (s.queue_batches + 1) * s.batch_size * s.seq_len)


def available_memory(device: str) -> int:
    """Bytes this process can still allocate on ``device``: free device memory on CUDA; on the host the smaller
    of MemAvailable and the cgroup's remaining limit."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return min(meminfo_available(), cgroup_available())


def meminfo_available() -> int:
    """MemAvailable from /proc/meminfo (physical memory where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_available() -> int:
    """Memory left under this process's cgroup v2 limit (unbounded where there is no limit)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return max(0, int(limit) - used) if limit != "max" else 2**63
    except (OSError, ValueError):
        return 2**63


def check_memory(sizes: Sizes, device: str) -> None:
    """Refuse batch and chunk sizes whose buffers cannot fit in this machine's memory (a lower bound, so nothing
    that could run is refused)."""
    needs = {"host": host_bytes(sizes) + (0 if device.startswith("cuda") else batch_bytes(sizes))}
    if device.startswith("cuda"):
        needs[device] = batch_bytes(sizes)
    for where, need in needs.items():
        free = available_memory(device if where != "host" else "cpu")
        if need > free:
            raise DepthcacheError(f"this extraction needs at least {need / GIB:,.1f} GiB of {where} memory per "
                                  f"batch and chunk, and {free / GIB:,.1f} GiB is free: lower --batch-size, "
                                  "--seq-len or --chunk-tokens")


def store_bytes(sizes: Sizes, dtype: str) -> int:
    """A lower bound on the disk bytes the tokens still to write will take (bf16 compressed at best ×1.5)."""
    return int(sizes.remaining * activation_bytes(sizes) / COMPRESSION_AT_BEST[dtype])


def check_disk(out: str, sizes: Sizes, dtype: str) -> None:
    """Refuse an extraction that cannot fit in the free space where its store goes."""
    path = Path(out).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    need = store_bytes(sizes, dtype)
    if need > free:
        raise DepthcacheError(f"the store needs at least {need / GIB:,.1f} GiB more and {existing} has "
                              f"{free / GIB:,.1f} GiB free: free space, or lower --max-tokens or the --sites and "
                              "--layers stored")


def preflight(attrs: dict[str, Any], sizes: Sizes, config: Any, out: str, device: str, new: bool) -> None:
    """Every check of an extraction against the model, the limits and the machine, before anything is written."""
    check_model_options(sizes.seq_len, sizes.top_k, sizes.vocab, config)
    check_chunking(sizes)
    if new:
        check_store_attrs(attrs)
    check_memory(sizes, device)
    check_disk(out, sizes, attrs["options"]["dtype"])


def weights_room(device: str) -> int:
    """Bytes the weights may take on ``device`` (its free memory; a seam tests narrow to force offloading)."""
    return available_memory(device)


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, for messages and suggested --max-memory values."""
    return f"{n / GIB:,.1f}GiB"


def placement_budget(placement: Placement, device: str, host_free: int) -> tuple[int, int, str]:
    """(bytes the weights may take in memory under ``placement``, free disk bytes of --offload-folder (0 without
    one), where that is): --max-memory's devices (the host's free share when it names none)."""
    memory = parse_max_memory(placement.max_memory)
    if not memory:
        memory = {"cpu": int(HOST_SHARE * host_free)} if not device.startswith("cuda") else \
            {i: weights_room(f"cuda:{i}") for i in range(torch.cuda.device_count())} | {"cpu": host_free}
    where = ", ".join(f"{'cpu' if k == 'cpu' else f'cuda:{k}'} {gib(v)}" for k, v in memory.items())
    total = sum(memory.values())
    if placement.offload_folder is not None:
        folder = Path(placement.offload_folder).expanduser().resolve()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        disk = shutil.disk_usage(existing).free
        return total, disk, f"{where} and {gib(disk)} of disk at {folder}"
    return total, 0, where


def check_model_fits(need: int, placement: Placement, device: str, dtype: torch.dtype, host_free: int) -> None:
    """Refuse, before loading, weights that cannot fit where they would go, naming the options that make them fit:
    --offload-folder (weights beyond memory read from disk on each forward), a device map over several GPUs, or a
    smaller --model-dtype."""
    name = str(dtype).removeprefix("torch.")
    smaller = "" if dtype != torch.float32 else f"; or --model-dtype bfloat16 (about {gib(need / 2)} of weights)"
    if not placement.dispatched:
        free = weights_room(device)
        if need <= free:
            return
        spread = "--device-map auto (spreads the layers over every GPU and the host), " if device.startswith(
            "cuda") else ""
        raise DepthcacheError(
            f"the model's weights take {gib(need)} in {name} and {device} has {gib(free)} free: run with "
            f"{spread}--max-memory {'cuda:0' if device.startswith('cuda') else 'cpu'}={gib(0.8 * free)} "
            f"--offload-folder DIR (the layers beyond it, about {gib(need - 0.8 * free)}, are read from DIR on each "
            f"forward pass){smaller}; nothing was written")
    memory, disk, where = placement_budget(placement, device, host_free)
    if need > memory + disk:
        advice = f"put --offload-folder on a disk with at least {gib(need - memory)} free" \
            if placement.offload_folder else f"add --offload-folder DIR (the {gib(need - memory)} beyond --max-memory " \
            "are read from DIR on each forward pass)"
        raise DepthcacheError(f"the model's weights take {gib(need)} in {name} and the placement gives them "
                              f"{gib(memory + disk)} ({where}): {advice}{smaller}; nothing was written")


def load_fitted(spec: str, device: str, placement: Placement = Placement(), progress: bool | None = None,
                check: bool = True) -> LoadedModel:
    """``load_model`` as every depthcache command loads by spec: the weights' size (from the config, on the meta
    device) checked against where ``placement`` puts them first, so a model that cannot fit is refused with the
    options that make it fit, before anything is loaded or written."""
    target = str(resolve_device(device))
    host_free = weights_room("cpu")
    folder = weights_folder(spec)
    dtype = placement.dtype(device)
    need = None if folder is None else weight_bytes(folder, dtype)
    if need is not None:
        check_model_fits(need, placement, target, dtype, host_free)
    return load_model(spec, device=device, progress=progress, check=check, placement=placement, host_free=host_free)
