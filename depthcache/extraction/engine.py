"""The extraction pipeline: forward passes with capture hooks → bounded queue → chunk writer → committed store.

Batches are fixed (window b*B..(b+1)*B, padded to ``seq_len``), so a resumed run recomputes exactly the
same batches as an uninterrupted one; progress is committed per chunk after its files are durable.
"""

from __future__ import annotations

import errno
import os
import platform
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

import depthcache
from depthcache.dtypes import ITEMSIZES
from depthcache.errors import DepthcacheError, Interrupted
from depthcache.extraction.data import DEFAULT_DATASET, DataFields, load_documents
from depthcache.extraction.interrupts import interrupted_message, stop_on_signals
from depthcache.extraction.model_group import write_model_group
from depthcache.extraction.preflight import Sizes, load_fitted, preflight
from depthcache.extraction.task_data import (
    TaskDocuments,
    task_attrs,
    task_columns,
    task_windows,
)
from depthcache.extraction.windows import Documents, Window, bos_token_id, make_windows, tokenize_documents
from depthcache.extraction.workers import (
    Worker,
    batch_tokens,
    commit_worker,
    finalize,
    segments,
    unfinished_workers,
    worker_done_until,
)
from depthcache.extraction.writer import ChunkWriter, resume_point
from depthcache.layerspec import parse_layers
from depthcache.model import (
    DEFAULT_MODEL,
    CaptureInto,
    LoadedModel,
    Placement,
    Structure,
    checked,
    main_device,
    placed_attrs,
    token_runs,
)
from depthcache.progress import MINUTE, Progress
from depthcache.store.head import tokenizer_sha256
from depthcache.store.identity import differences
from depthcache.store.io import (
    can_write,
    open_group,
    process_alive,
    read_attrs,
    replace_atomically,
    require_writable,
    write_attrs,
)
from depthcache.store.layout import (
    DEFAULT_SHARD_MIB,
    MIB,
    PARTS_SITE,
    SCHEMA_VERSION,
    SHARD_MIB_BOUNDS,
    SITES,
    StoreLayout,
    choose_chunk_tokens,
    choose_token_shard_tokens,
    create_arrays,
    is_part,
    layout_units,
    part_modules,
    site_arrays,
)
from depthcache.store.leftovers import remove_leftovers

LAYERED = ("resid_pre", "attn_out", "mlp_out")
SUMMARY_ROWS = 256  # logits rows per block of the output summary: temporaries of SUMMARY_ROWS x vocab floats
# (first token, stored arrays, copy event (CUDA), release the arrays' buffers (or None)) of one batch
Batch = tuple[int, dict[str, np.ndarray], "torch.cuda.Event | None", "Callable[[], None] | None"]
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExtractOptions:
    """Everything that decides what an extraction computes (all but ``out``, ``device`` and ``resume``)."""

    out: str
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATASET
    sites: tuple[str, ...] = SITES
    layers: str = "all"
    max_tokens: int | None = 16384
    seq_len: int = 128
    batch_size: int = 8
    dtype: str = "bfloat16"
    top_k: int = 20
    chunk_tokens: int | None = None  # None: the largest power of two keeping an all-layer shard ≤ shard_mib (≤ tokens)
    shard_mib: int = DEFAULT_SHARD_MIB  # schema 2.0: target size of one all-layer shard (one object per array)
    token_shard_tokens: int | None = None  # None: enough whole chunks for 128 MiB of resid_final (or every token)
    device: str = "auto"
    resume: bool = False
    progress: bool | None = None  # None: a bar on a terminal, a line per minute elsewhere
    num_workers: int = 1  # several processes writing disjoint shards of one store
    worker_index: int = 0
    queue_batches: int = 2
    check: bool = True  # the load check before anything is written (--no-check: only for users who know why)
    zstd_level: int | None = None  # activations: checksummed only (None) or zstd-compressed at this level
    fields: DataFields = DataFields()  # which record fields are the text, or a task's prompt and answer
    placement: Placement = Placement()  # --device-map, --max-memory, --offload-folder, --model-dtype


@dataclass
class Plan:
    """The deterministic work list of an extraction."""

    windows: list[Window]
    layers: tuple[int, ...]
    n_tokens: int = field(init=False)
    offsets: np.ndarray = field(init=False)  # first token index of each window

    def __post_init__(self) -> None:
        lengths = np.array([len(w.tokens) for w in self.windows], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.n_tokens = int(self.offsets[-1])


def parse_sites(sites: tuple[str, ...] | str) -> tuple[str, ...]:
    """Validate a site list ('resid,attn,mlp'), keeping the canonical order."""
    names = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites) if s.strip()]
    known = (*SITES, PARTS_SITE)
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise DepthcacheError(f"unknown site(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return tuple(s for s in known if s in names)


def model_sites(sites: tuple[str, ...], structure: Structure) -> tuple[str, ...]:
    """The asked sites the model has: a branch role no layer has (a Mamba model's MLP) is not stored, not zeros;
    ``parts`` only where some layer has several modules of a role (else attn_out and mlp_out are the parts)."""
    kept = tuple(s for s in sites if s == "resid" or s in structure.roles
                 or (s == PARTS_SITE and stored_parts(structure)))
    if not kept:
        raise DepthcacheError(f"{structure.class_name} has no {' or '.join(sites)} branch (its layers add "
                              f"{' and '.join(structure.roles)}): choose --sites from resid, {', '.join(structure.roles)}")
    return kept


def stored_parts(structure: Structure) -> tuple[str, ...]:
    """The branch modules the site ``parts`` stores apart for this model (see ``part_modules``)."""
    return part_modules(structure.attn, structure.mlp)


def check_options(opts: ExtractOptions) -> None:
    """Refuse bad options before any model is loaded."""
    if opts.dtype not in ITEMSIZES:
        raise DepthcacheError(f"unknown --dtype {opts.dtype!r}; choose from {', '.join(ITEMSIZES)}")
    for name in ("seq_len", "batch_size", "top_k", "chunk_tokens", "token_shard_tokens"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise DepthcacheError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.max_tokens is not None and opts.max_tokens < 1:
        raise DepthcacheError("--max-tokens must be at least 1")
    low, high = SHARD_MIB_BOUNDS
    if not low <= opts.shard_mib <= high:
        raise DepthcacheError(f"--shard-mib must be between {low} and {high} (a shard is written whole, from memory)")
    if opts.zstd_level is not None and not 1 <= opts.zstd_level <= 22:
        raise DepthcacheError("--zstd-level must be between 1 and 22 (faster levels do not compress activations)")


def check_destination(out: str, resume: bool) -> bool:
    """True if ``out`` holds a store to resume; refuses to touch an existing store without --resume, and a place
    this process cannot write (checked before anything is loaded; nothing is created here)."""
    path = Path(out)
    if path.exists():
        if not resume:
            raise DepthcacheError(f"{out} already exists: pass --resume to continue that extraction "
                                  "(with identical options), or choose another --out")
        if not (path / "zarr.json").exists():
            raise DepthcacheError(f"{out} exists and is not a depthcache store; refusing to write into it")
        if not can_write(path):
            raise DepthcacheError(f"cannot resume into {out}: it is not writable (a read-only copy?); resume a "
                                  "writable copy of it")
        return True
    require_writable(path)  # nothing is created before every check has passed (prepare_store makes the folders)
    return False


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest last (to remove on failure)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    for p in missing:
        p.mkdir(exist_ok=True)
    return missing


def remove_stale_creations(out: Path) -> None:
    """Remove temporary store folders (``.NAME.creating-PID``) left by killed processes of this machine."""
    for tmp in out.parent.glob(f".{out.name}.creating-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (xarray's from its metadata: importing it costs start-up)."""
    from importlib.metadata import version

    import transformers

    return {"depthcache": depthcache.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__, "xarray": version("xarray"),
            "python": platform.python_version()}


def provenance(opts: ExtractOptions, loaded: LoadedModel, docs_name: str, docs_sha: str, n_docs: int, plan: Plan,
               device: str, chunk_tokens: int, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The root attributes of a new store (schema ``SCHEMA_VERSION``): with the model's discovered structure and its
    load-check errors (None when the check was skipped), and how the documents were read (``details``: datasets
    fingerprint, fields)."""
    details = {k: v for k, v in (details or {}).items() if v is not None and v != {}}
    model = loaded.model
    config = model.config
    structure, result = checked(model, opts.check)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "activations",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "model": {**loaded.provenance,
                  "n_layers": structure.n_layers,
                  "d_model": int(model.get_output_embeddings().weight.shape[1]),
                  "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
                  "config": config.to_diff_dict() | {"model_type": config.model_type},
                  "tokenizer_sha256": tokenizer_sha256(loaded.tokenizer_files),
                  "parallel_residual": structure.parallel,
                  "structure": structure.attrs(),
                  "load_check": None if result is None else result.attrs()},
        "dataset": {"spec": opts.data, "name": docs_name, "sha256": docs_sha, "n_documents": n_docs,
                    **details},
        "options": {"sites": list(parse_sites(opts.sites)), "layers": list(plan.layers), "max_tokens": opts.max_tokens,
                    "seq_len": opts.seq_len, "batch_size": opts.batch_size, "dtype": opts.dtype, "top_k": opts.top_k,
                    "device": device, **placed_attrs(model)},
        "layout": {"n_tokens": plan.n_tokens, "n_windows": len(plan.windows), "chunk_tokens": chunk_tokens},
        "progress": {"tokens_committed": 0, "complete": False},
    }


def compare_identity(existing: dict[str, Any], new: dict[str, Any], out: str) -> None:
    """Refuse to resume a store made from another model, dataset or options."""
    diffs = differences(existing, new)
    old, now = existing["options"].get("model_dtype"), new["options"].get("model_dtype")
    if old and now and old != now:  # recorded since --model-dtype exists; older stores computed in float32
        diffs.append(f"  options.model_dtype: store has {old!r}, this run has {now!r}")
    if diffs:
        raise DepthcacheError(f"{out} was extracted with other settings; refusing to mix them:\n" + "\n".join(diffs))


def token_columns(plan: Plan, first: int, last: int) -> dict[str, np.ndarray]:
    """Per-token bookkeeping arrays for windows first..last-1, computed on the host."""
    cols: dict[str, list[np.ndarray]] = {"token_id": [], "doc_id": [], "seq_id": [], "position": [],
                                         "next_token_id": []}
    for seq in range(first, last):
        w = plan.windows[seq]
        n = len(w.tokens)
        tokens = np.asarray(w.tokens, dtype=np.int32)
        cols["token_id"].append(tokens)
        cols["doc_id"].append(np.full(n, w.doc_id, dtype=np.int32))
        cols["seq_id"].append(np.full(n, seq, dtype=np.int32))
        cols["position"].append(np.arange(n, dtype=np.int32))
        cols["next_token_id"].append(np.append(tokens[1:], np.int32(w.next_token)))
    out = {k: np.concatenate(v) for k, v in cols.items()}
    if plan.windows[first].answer_start is not None:  # a task store (schema 1.2)
        out |= task_columns(plan.windows[first:last])
    return out


def batch_inputs(windows: list[Window], seq_len: int, pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask of fixed shape (len(windows), seq_len)."""
    ids = torch.full((len(windows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), seq_len), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, :len(w.tokens)] = torch.tensor(w.tokens)
        mask[row, :len(w.tokens)] = 1
    return ids.to(device), mask.to(device)


def to_host(tensor: torch.Tensor, dtype: str | None = None) -> np.ndarray:
    """Cast on the device, copy to the host (pinned and asynchronous on CUDA: wait on the batch's event), view as numpy
    (bfloat16 as its uint16 bit patterns, as the writer takes them)."""
    t = tensor.to(TORCH_DTYPES[dtype]) if dtype else tensor
    if t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        t = host
    return host_view(t)


def output_summary(logits: torch.Tensor, next_ids: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Next-token log-prob (NaN where no next token) and the top-k log-probs with ids, in float32."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = torch.topk(logits, top_k, dim=-1)
    has_next = next_ids >= 0
    picked = logits.gather(-1, next_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1) - lse
    next_lp = torch.where(has_next, picked, torch.full_like(picked, float("nan")))
    return {"next_logprob": next_lp, "topk_ids": ids.int(), "topk_logprobs": values - lse.unsqueeze(-1)}


def captured_names(sites: tuple[str, ...], structure: Structure) -> tuple[str, ...]:
    """The activation arrays a site list stores, in the store's order."""
    return site_arrays(sites, stored_parts(structure))


def layered(name: str) -> bool:
    """An array with a layer dimension (per-layer activations)."""
    return name in LAYERED or is_part(name)


class BatchBuffers:
    """Stored-dtype arrays for one batch of at most ``tokens`` tokens, in host memory (pinned when the model is on
    CUDA), which the capture hooks (CPU) or the side-stream copies (CUDA) fill and the writer reads.

    ``release`` hands them back to their pool once the writer has copied them into its chunk buffers.
    """

    def __init__(self, names: tuple[str, ...], n_layers: int, tokens: int, d_model: int, dtype: torch.dtype,
                 device: str, pool: queue.Queue | None = None) -> None:
        pinned = device.startswith("cuda")
        self.host = {name: torch.empty(array_shape(name, n_layers, tokens, d_model), dtype=dtype, pin_memory=pinned)
                     for name in names}
        self.pool = pool

    def arrays(self, n: int) -> dict[str, np.ndarray]:
        """Numpy views of the first ``n`` tokens of every array (bf16 viewed through its bit pattern)."""
        return {name: host_view(t[:, :n] if layered(name) else t[:n]) for name, t in self.host.items()}

    def release(self) -> None:
        """Back to the pool: the writer is done with these arrays."""
        if self.pool is not None:
            self.pool.put(self)


def array_shape(name: str, n_layers: int, tokens: int, d_model: int) -> tuple[int, ...]:
    """Shape of one batch's array: (layer, token, d_model) for the per-layer sites, (token, d_model) for resid_final."""
    return (n_layers, tokens, d_model) if layered(name) else (tokens, d_model)


def host_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 as its uint16 bit patterns (numpy has no bf16 of its own, and the
    writer stores the bits as they are: no ml_dtypes)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


class DeviceStage:
    """CUDA only: capture targets on the device (two alternating sets) and a side stream that copies each batch's
    kept rows into pinned host buffers while the next batch computes."""

    def __init__(self, names: tuple[str, ...], n_layers: int, tokens: int, d_model: int, dtype: torch.dtype,
                 device: str) -> None:
        self.sets = [{name: torch.empty(array_shape(name, n_layers, tokens, d_model), dtype=dtype, device=device)
                      for name in names} for _ in range(2)]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.stream = torch.cuda.Stream(device=device)
        self.turn = 0

    def targets(self) -> dict[str, torch.Tensor]:
        """The device set for the next batch, once the side stream has finished copying it out two batches ago."""
        done = self.done[self.turn]
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return self.sets[self.turn]

    def copy_out(self, host: BatchBuffers, n: int) -> torch.cuda.Event:
        """Queue the copies of the first ``n`` tokens to ``host`` on the side stream; the event marks their end."""
        source = self.sets[self.turn]
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for name, t in source.items():
                rows = (slice(None), slice(0, n)) if layered(name) else (slice(0, n),)
                host.host[name][rows].copy_(t[rows], non_blocking=True)
            event = self.stream.record_event()
        self.done[self.turn] = event
        self.turn = 1 - self.turn
        return event


def summary_rows(logits: torch.Tensor, runs: tuple[tuple[int, int, int], ...], next_ids: torch.Tensor,
                 top_k: int) -> dict[str, torch.Tensor]:
    """``output_summary`` of the kept rows ``runs`` of a (batch, seq, vocab) logits tensor, computed over blocks of
    SUMMARY_ROWS rows of the whole batch: no gathered copy of the logits and small temporaries, with results
    identical to ``output_summary`` of the gathered rows (each row's reductions are the same operations)."""
    flat = logits.reshape(-1, logits.shape[-1])
    index = torch.cat([torch.arange(a, b, device=flat.device) for a, b, _ in runs])
    if len(index) < torch.get_num_threads():  # so few rows that torch would split each row's reduction
        return output_summary(flat.index_select(0, index), next_ids, top_k)
    bounds = list(range(0, flat.shape[0], SUMMARY_ROWS)) + [flat.shape[0]]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < torch.get_num_threads():
        del bounds[-2]
    lse, values, ids = [], [], []
    for a, b in zip(bounds, bounds[1:]):
        block = flat[a:b].float()
        lse.append(torch.logsumexp(block, dim=-1))
        top = torch.topk(block, top_k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    lse_kept = torch.cat(lse).index_select(0, index)
    picked = flat[index, next_ids.clamp(min=0)].float() - lse_kept
    next_lp = torch.where(next_ids >= 0, picked, torch.full_like(picked, float("nan")))
    return {"next_logprob": next_lp, "topk_ids": torch.cat(ids).index_select(0, index).int(),
            "topk_logprobs": torch.cat(values).index_select(0, index) - lse_kept.unsqueeze(-1)}


def run_batch_into(model: torch.nn.Module, cap: CaptureInto, buffers: BatchBuffers, stage: DeviceStage | None,
                   plan: Plan, opts: ExtractOptions, first: int, last: int, pad_id: int, device: str, drop: int,
                   keep: int) -> tuple[dict[str, np.ndarray], torch.cuda.Event | None]:
    """Forward windows first..last-1 with the hooks copying real tokens ``drop``..``drop + keep`` into ``buffers``
    (via the device stage on CUDA); returns every stored array of those tokens and, on CUDA, the copies' event."""
    windows = plan.windows[first:last]
    ids, mask = batch_inputs(windows, opts.seq_len, pad_id, device)
    host = token_columns(plan, first, last)
    runs = token_runs([len(w.tokens) for w in windows], opts.seq_len, drop, keep)
    cap.into(stage.targets() if stage else buffers.host, runs)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        next_ids = torch.from_numpy(host["next_token_id"][drop:drop + keep]).long().to(device)
        summary = summary_rows(logits, runs, next_ids, opts.top_k)
        copied = stage.copy_out(buffers, keep) if stage else None
    out = buffers.arrays(keep)
    out.update({k: to_host(v) for k, v in summary.items()})
    out.update({k: v[drop:drop + keep] for k, v in host.items()})
    return out, copied


def copied_event(device: str) -> torch.cuda.Event | None:
    """On CUDA, an event the writer waits on before reading the batch's host copies (they overlap the next batch)."""
    if not device.startswith("cuda"):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def batches_between(plan: Plan, start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(first window, last window, tokens to drop, tokens to keep) of the fixed batches covering [start, stop)."""
    seq = int(np.searchsorted(plan.offsets, start, side="right") - 1)
    for b in range(seq // batch_size, -(-len(plan.windows) // batch_size)):
        first, last = b * batch_size, min((b + 1) * batch_size, len(plan.windows))
        begin, end = int(plan.offsets[first]), int(plan.offsets[last])
        if begin >= stop:
            return
        drop = max(0, start - begin)
        yield first, last, drop, min(end, stop) - begin - drop


def first_tokens(batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` tokens of a batch (views; the token axis is 1 for per-layer arrays, else 0)."""
    return {k: v[:, :n] if layered(k) else v[:n] for k, v in batch.items()}


def prepare_store(opts: ExtractOptions, attrs: dict[str, Any], layout: StoreLayout, loaded: LoadedModel) -> bool:
    """Create a complete empty store in a temporary sibling folder and move it into place atomically; on any
    failure (a full disk, an interrupt) nothing is left behind, not even the parent folders this created.

    Returns False (and leaves the existing store alone) when another worker moved its store into place first.
    """
    out = Path(opts.out).resolve()
    created = make_parents(out.parent)
    if opts.num_workers == 1:
        remove_stale_creations(out)
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        create_arrays(group, layout)
        write_model_group(group, loaded)
        write_attrs(group, attrs)
        try:
            replace_atomically(tmp, out)
        except OSError:
            if (out / "zarr.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
        return True
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            remove_if_empty(folder)
        if isinstance(exc, OSError):
            advice = "free space and run again" if exc.errno == errno.ENOSPC else "fix that and run again"
            raise DepthcacheError(f"cannot create {opts.out}: {exc.strerror or exc}; nothing was left behind: "
                                  f"{advice}") from exc
        raise


def remove_if_empty(folder: Path) -> None:
    """Remove a folder this run created, unless something else has been put in it meanwhile."""
    try:
        folder.rmdir()
    except OSError:
        pass


def make_plan(opts: ExtractOptions, loaded: LoadedModel, docs: Documents, n_layers: int) -> Plan:
    """The deterministic windows and stored layers of an extraction of ``docs`` (one window per item of a task)."""
    if isinstance(docs, TaskDocuments):
        return Plan(task_windows(loaded.tokenizer, docs.items, opts.seq_len, opts.max_tokens),
                    parse_layers(opts.layers, n_layers))
    return Plan(make_windows(tokenize_documents(loaded.tokenizer, docs), opts.seq_len,
                             bos_token_id(loaded.tokenizer), opts.max_tokens), parse_layers(opts.layers, n_layers))


def extract(opts: ExtractOptions, loaded: LoadedModel | None = None, docs: Documents | None = None) -> dict[str, Any]:
    """Run (or resume) one extraction into ``opts.out`` (with ``loaded`` and ``docs`` if given, else as ``opts.model``
    and ``opts.data`` say); returns the final attributes.

    SIGINT and SIGTERM stop it at the last committed chunk (the chunk being filled is dropped) and raise
    Interrupted, whose message says how to resume."""
    with stop_on_signals():
        try:
            return extract_store(opts, loaded, docs)
        except Interrupted as exc:
            raise Interrupted(exc.signum, interrupted_message(exc.signum, opts.out)) from None


def extract_store(opts: ExtractOptions, loaded: LoadedModel | None = None, docs: Documents | None = None
                  ) -> dict[str, Any]:
    """The body of ``extract``: every check (options, destination, model, limits, machine), then the store."""
    check_options(opts)
    sites = parse_sites(opts.sites)
    worker = Worker(opts.worker_index, opts.num_workers)
    resuming = check_destination(opts.out, opts.resume or worker.count > 1)
    remove_leftovers(opts.out, worker.count)  # temporary files of a write killed midway (none in a new store)
    existing = read_attrs(open_group(opts.out, "r")) if resuming else None
    docs = docs if docs is not None else load_documents(opts.data, opts.fields)
    loaded = loaded or load_fitted(opts.model, opts.device, opts.placement, opts.progress, opts.check)
    device = main_device(loaded.model)  # where inputs go: the device, or a device map's first GPU (else the host)
    structure, _ = checked(loaded.model, opts.check)  # a model passed in is checked here, before any store exists
    opts = replace(opts, sites=model_sites(sites, structure))
    sites = opts.sites
    plan = make_plan(opts, loaded, docs, structure.n_layers)
    if plan.n_tokens == 0:
        raise DepthcacheError(f"dataset {opts.data!r} tokenizes to no tokens")
    d_model = int(loaded.model.get_output_embeddings().weight.shape[1])
    chunk_tokens = opts.chunk_tokens or choose_chunk_tokens(len(plan.layers), d_model, ITEMSIZES[opts.dtype],
                                                            plan.n_tokens, opts.shard_mib * MIB)
    token_shard = opts.token_shard_tokens or choose_token_shard_tokens(chunk_tokens, d_model, ITEMSIZES[opts.dtype],
                                                                       plan.n_tokens)
    if token_shard is not None and token_shard % chunk_tokens:
        raise DepthcacheError(f"--token-shard-tokens {token_shard} must be a multiple of the {chunk_tokens}-token "
                              "chunks")
    attrs = provenance(opts, loaded, docs.name, docs.sha256, len(docs.texts), plan, device, chunk_tokens, docs.details)
    attrs["layout"]["num_workers"] = worker.count
    if token_shard is not None:  # None: a 1.x layout (unsharded), which only tests of old stores make
        attrs["layout"]["token_shard_tokens"] = token_shard
    task = isinstance(docs, TaskDocuments)
    if task:
        attrs["dataset"] |= task_attrs(docs)
    if existing:
        compare_identity(existing, attrs, opts.out)
        compare_layout(existing, opts, chunk_tokens)
        if existing["progress"]["complete"]:
            return existing
        attrs = existing
    sizes = extraction_sizes(opts, attrs, plan, captured_names(sites, structure), d_model)
    preflight(attrs, sizes, loaded.model.config, opts.out, device, new=existing is None)
    if not existing:
        layout = StoreLayout(plan.n_tokens, plan.layers, d_model, opts.top_k, sites, opts.dtype, chunk_tokens, task,
                             opts.zstd_level, token_shard, stored_parts(structure) if PARTS_SITE in sites else ())
        if not prepare_store(opts, attrs, layout, loaded):  # another worker created it first
            existing = read_attrs(open_group(opts.out, "r"))
            compare_identity(existing, attrs, opts.out)
            attrs = existing
    return run_pipeline(opts, attrs, loaded, structure, plan, device, worker)


def compare_layout(existing: dict[str, Any], opts: ExtractOptions, chunk_tokens: int) -> None:
    """Refuse to resume with a --chunk-tokens or --shard-mib that gives other chunks than the store's (given
    explicitly; left out, the store's own are used)."""
    chunk = int(existing["layout"]["chunk_tokens"])
    given = "--chunk-tokens" if opts.chunk_tokens is not None else \
        "--shard-mib" if opts.shard_mib != DEFAULT_SHARD_MIB else None
    if given and chunk_tokens != chunk:
        raise DepthcacheError(f"{given} gives {chunk_tokens:,}-token chunks, the store has {chunk:,}: its chunks are "
                              f"fixed when it is created; leave {given} out to resume")


def extraction_sizes(opts: ExtractOptions, attrs: dict[str, Any], plan: Plan, names: tuple[str, ...],
                     d_model: int) -> Sizes:
    """The sizes the preflight checks weigh: tokens (still to write), stored layers and arrays, chunk and batch."""
    o = attrs["options"]
    return Sizes(n_tokens=plan.n_tokens, remaining=plan.n_tokens - int(attrs["progress"]["tokens_committed"]),
                 n_layers=len(plan.layers), d_model=d_model, vocab=int(attrs["model"]["vocab_size"]),
                 sites=sum(map(layered, names)), final=int("resid_final" in names), itemsize=ITEMSIZES[o["dtype"]],
                 chunk_tokens=int(attrs["layout"]["chunk_tokens"]), seq_len=int(o["seq_len"]),
                 batch_size=int(o["batch_size"]), top_k=int(o["top_k"]), queue_batches=opts.queue_batches)


def finalize_store(out: str) -> dict[str, Any]:
    """``extract --finalize``: mark a store written by several workers complete, once all of them are done."""
    group = open_group(out, "r+")
    attrs = read_attrs(group)
    if attrs["progress"]["complete"]:
        return attrs
    return finalize(group, attrs, int(attrs["layout"].get("num_workers", 1)))


def run_pipeline(opts: ExtractOptions, attrs: dict[str, Any], loaded: LoadedModel, structure: Structure, plan: Plan,
                 device: str, worker: Worker = Worker()) -> dict[str, Any]:
    """Forward in this thread, write in a background thread, joined by a bounded queue."""
    group = open_group(opts.out, "r+")
    chunk_tokens, unit = layout_units(attrs["layout"])
    done = resume_point(worker_done_until(group, worker), chunk_tokens, plan.n_tokens)
    todo = segments(worker, plan.n_tokens, unit, batch_tokens(attrs), done)

    def commit(stop: int) -> None:
        if worker.count > 1:
            commit_worker(group, worker, stop)
        else:
            attrs["progress"] = {"tokens_committed": stop, "complete": stop == plan.n_tokens}
            write_attrs(group, attrs)

    start = todo[0][0] if todo else plan.n_tokens
    writer = ChunkWriter(group, None, chunk_tokens, plan.n_tokens, start, commit)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batches = planned_batches(loaded.model, structure, plan, opts, todo, pad_id, device)
    write_batches(writer, batches, sum(b - a for a, b in todo), opts)
    if worker.count > 1 and not unfinished_workers(group, attrs, worker.count):
        attrs = finalize(group, attrs, worker.count)
    return attrs


def planned_batches(model: torch.nn.Module, structure: Structure, plan: Plan, opts: ExtractOptions,
                    todo: list[tuple[int, int]], pad_id: int, device: str) -> Iterator[Batch]:
    """(first token, stored arrays, copy event, release) of each batch covering the token ranges ``todo``, run
    lazily; the arrays live in a pool of ``max(2, queue_batches)`` preallocated buffers the writer releases."""
    names = captured_names(parse_sites(opts.sites), structure)
    d_model = int(model.get_output_embeddings().weight.shape[1])
    dtype, tokens = TORCH_DTYPES[opts.dtype], opts.batch_size * opts.seq_len
    pool: queue.Queue[BatchBuffers] = queue.Queue()
    for _ in range(max(2, opts.queue_batches)):
        pool.put(BatchBuffers(names, len(plan.layers), tokens, d_model, dtype, device, pool))
    stage = DeviceStage(names, len(plan.layers), tokens, d_model, dtype, device) if device.startswith("cuda") \
        else None
    with CaptureInto(model, structure, plan.layers, names) as cap:
        for seg_start, seg_stop in todo:
            at = seg_start
            for first, last, drop, keep in batches_between(plan, seg_start, seg_stop, opts.batch_size):
                buffers = pool.get()
                batch, copied = run_batch_into(model, cap, buffers, stage, plan, opts, first, last, pad_id, device,
                                               drop, keep)
                yield at, batch, copied, buffers.release
                at += keep


def write_batches(writer: ChunkWriter, batches: Iterator[Batch], total: int, opts: ExtractOptions,
                  desc: str = "extract") -> None:
    """Run ``batches`` (the forward passes) in this thread and write them in a background thread, joined by a
    bounded queue; ``total`` tokens drive the progress named ``desc``. When this thread stops early (an interrupt,
    an error), the writer finishes the chunk it is writing and drops the tokens of the chunk it is filling. Each
    batch's ``release`` (if any) runs once the writer is done with it, also after a failure, so a producer waiting
    for free buffers never waits forever."""
    pending: queue.Queue[Batch | None] = queue.Queue(maxsize=opts.queue_batches)
    failure: list[BaseException] = []
    stopped = threading.Event()

    def drain() -> None:
        try:
            while (item := pending.get()) is not None:
                at, batch, copied, release = item
                try:
                    if stopped.is_set():
                        continue
                    if copied is not None:
                        copied.synchronize()
                    writer.append(batch, at)
                finally:
                    if release is not None:
                        release()
            if not stopped.is_set():
                writer.finish()
        except BaseException as exc:  # handed to the forward thread, which re-raises it
            failure.append(exc)
            while (item := pending.get()) is not None:
                if item[3] is not None:
                    item[3]()

    thread = threading.Thread(target=drain, name="depthcache-writer", daemon=True)
    thread.start()
    bar = Progress(desc, total, "tok", opts.progress, every=MINUTE)
    finished = False
    try:
        for item in batches:
            pending.put(item)
            seconds = max(bar.clock() - bar.started, 1e-9)
            bar.note(f"{writer.bytes_written / seconds / 2**20:.0f} MB/s written")
            bar.update(len(item[1]["token_id"]))
            if failure:
                break
        else:
            finished = True
    finally:
        if not finished:
            stopped.set()
        pending.put(None)
        thread.join()
        writer.close()
        bar.close()
    if failure:
        raise failure[0]
