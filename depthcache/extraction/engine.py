"""The extraction pipeline: forward passes with capture hooks → bounded queue → chunk writer → committed store.

Batches are fixed (window b*B..(b+1)*B, padded to ``seq_len``), so a resumed run recomputes exactly the
same batches as an uninterrupted one; progress is committed per chunk after its files are durable.
"""

from __future__ import annotations

import os
import platform
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

import depthcache
from depthcache.dtypes import STORED_DTYPES
from depthcache.errors import DepthcacheError
from depthcache.extraction.data import DEFAULT_DATASET, load_documents
from depthcache.extraction.model_group import write_model_group
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
from depthcache.extraction.writer import ChunkWriter
from depthcache.layerspec import parse_layers
from depthcache.model import (
    DEFAULT_MODEL,
    Architecture,
    Capture,
    LoadedModel,
    architecture_for,
    load_model,
    n_layers,
    parallel_residual,
    resolve_device,
)
from depthcache.progress import MINUTE, Progress
from depthcache.store.head import tokenizer_sha256
from depthcache.store.io import open_group, read_attrs, write_attrs
from depthcache.store.layout import (
    SCHEMA_VERSION,
    SITES,
    StoreLayout,
    choose_chunk_tokens,
    create_arrays,
)

LAYERED = ("resid_pre", "attn_out", "mlp_out")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IDENTITY_OPTIONS = ("sites", "layers", "max_tokens", "seq_len", "batch_size", "dtype", "top_k")


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
    chunk_tokens: int | None = None  # None: the largest power of two keeping an all-layer chunk ≤ 32 MiB
    device: str = "auto"
    resume: bool = False
    progress: bool | None = None  # None: a bar on a terminal, a line per minute elsewhere
    num_workers: int = 1  # several processes writing disjoint shards of one store
    worker_index: int = 0
    queue_batches: int = 2


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
    unknown = sorted(set(names) - set(SITES))
    if unknown or not names:
        raise DepthcacheError(f"unknown site(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SITES)}")
    return tuple(s for s in SITES if s in names)


def check_options(opts: ExtractOptions) -> None:
    """Refuse bad options before any model is loaded."""
    if opts.dtype not in STORED_DTYPES:
        raise DepthcacheError(f"unknown --dtype {opts.dtype!r}; choose from {', '.join(STORED_DTYPES)}")
    for name in ("seq_len", "batch_size", "top_k", "chunk_tokens"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise DepthcacheError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.max_tokens is not None and opts.max_tokens < 1:
        raise DepthcacheError("--max-tokens must be at least 1")


def check_destination(out: str, resume: bool) -> bool:
    """True if ``out`` holds a store to resume; refuses to touch an existing store without --resume."""
    path = Path(out)
    if path.exists():
        if not resume:
            raise DepthcacheError(f"{out} already exists: pass --resume to continue that extraction "
                                  "(with identical options), or choose another --out")
        if not (path / "zarr.json").exists():
            raise DepthcacheError(f"{out} exists and is not a depthcache store; refusing to write into it")
        return True
    parent = path.resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DepthcacheError(f"cannot write to {existing} ({exc.strerror}): choose a writable --out") from exc
    return False


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers."""
    import transformers
    import xarray

    return {"depthcache": depthcache.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__, "xarray": xarray.__version__,
            "python": platform.python_version()}


def provenance(opts: ExtractOptions, loaded: LoadedModel, docs_name: str, docs_sha: str, n_docs: int, plan: Plan,
               device: str, chunk_tokens: int) -> dict[str, Any]:
    """The root attributes of a new store (schema ``SCHEMA_VERSION``)."""
    model = loaded.model
    config = model.config
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "activations",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "model": {**loaded.provenance,
                  "n_layers": n_layers(model),
                  "d_model": int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd),
                  "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
                  "config": config.to_diff_dict() | {"model_type": config.model_type},
                  "tokenizer_sha256": tokenizer_sha256(loaded.tokenizer_files),
                  "parallel_residual": parallel_residual(model)},
        "dataset": {"spec": opts.data, "name": docs_name, "sha256": docs_sha, "n_documents": n_docs},
        "options": {"sites": list(parse_sites(opts.sites)), "layers": list(plan.layers), "max_tokens": opts.max_tokens,
                    "seq_len": opts.seq_len, "batch_size": opts.batch_size, "dtype": opts.dtype, "top_k": opts.top_k,
                    "device": device},
        "layout": {"n_tokens": plan.n_tokens, "n_windows": len(plan.windows), "chunk_tokens": chunk_tokens},
        "progress": {"tokens_committed": 0, "complete": False},
    }


def identity(attrs: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match for --resume to continue a store."""
    return {"model.weights_sha256": attrs["model"].get("weights_sha256"),
            "model.spec": attrs["model"].get("spec") if attrs["model"].get("weights_sha256") is None else None,
            "model.tokenizer_sha256": attrs["model"].get("tokenizer_sha256"),
            "dataset.sha256": attrs["dataset"]["sha256"],
            **{f"options.{k}": attrs["options"][k] for k in IDENTITY_OPTIONS},
            "layout.num_workers": attrs["layout"].get("num_workers", 1),
            "options.device_type": str(attrs["options"]["device"]).split(":")[0]}


def compare_identity(existing: dict[str, Any], new: dict[str, Any], out: str) -> None:
    """Refuse to resume a store made from another model, dataset or options."""
    old_id, new_id = identity(existing), identity(new)
    diffs = [f"  {k}: store has {old_id[k]!r}, this run has {new_id[k]!r}" for k in old_id if old_id[k] != new_id[k]]
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
    """Cast on the device, copy to the host (pinned and asynchronous on CUDA: wait on the batch's event), view as numpy."""
    t = tensor.to(TORCH_DTYPES[dtype]) if dtype else tensor
    if t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        t = host
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(STORED_DTYPES["bfloat16"])
    return t.numpy()


def output_summary(logits: torch.Tensor, next_ids: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Next-token log-prob (NaN where no next token) and the top-k log-probs with ids, in float32."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = torch.topk(logits, top_k, dim=-1)
    has_next = next_ids >= 0
    picked = logits.gather(-1, next_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1) - lse
    next_lp = torch.where(has_next, picked, torch.full_like(picked, float("nan")))
    return {"next_logprob": next_lp, "topk_ids": ids.int(), "topk_logprobs": values - lse.unsqueeze(-1)}


def run_batch(model: torch.nn.Module, arch: Architecture, plan: Plan, opts: ExtractOptions, first: int, last: int,
              pad_id: int, device: str, drop: int) -> tuple[dict[str, np.ndarray], torch.cuda.Event | None]:
    """Forward windows first..last-1 and return every stored array for their real tokens (minus the first ``drop``)."""
    sites = parse_sites(opts.sites)
    ids, mask = batch_inputs(plan.windows[first:last], opts.seq_len, pad_id, device)
    host = token_columns(plan, first, last)
    real = mask.bool().flatten()
    keep = None if bool(real.all()) else real.nonzero().squeeze(1)[drop:]

    def rows(t: torch.Tensor) -> torch.Tensor:
        """(..., batch, seq, d) → (..., real tokens after ``drop``, d); a view when every position is real."""
        flat = t.flatten(-3, -2)
        return flat[..., drop:, :] if keep is None else flat.index_select(-2, keep)

    with Capture(model, arch, plan.layers, sites, TORCH_DTYPES[opts.dtype]) as cap, torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out: dict[str, np.ndarray] = {}
        if "resid" in sites:
            out["resid_pre"] = to_host(rows(cap.stacked("resid_pre")), opts.dtype)
            out["resid_final"] = to_host(rows(cap.resid_final), opts.dtype)
        for site, name in (("attn", "attn_out"), ("mlp", "mlp_out")):
            if site in sites:
                out[name] = to_host(rows(cap.stacked(name)), opts.dtype)
        next_ids = torch.from_numpy(host["next_token_id"][drop:]).long().to(device)
        summary = output_summary(rows(logits), next_ids, opts.top_k)
    out.update({k: to_host(v) for k, v in summary.items()})
    out.update({k: v[drop:] for k, v in host.items()})
    return out, copied_event(device)


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
    return {k: v[:, :n] if k in LAYERED else v[:n] for k, v in batch.items()}


def prepare_store(opts: ExtractOptions, attrs: dict[str, Any], layout: StoreLayout, loaded: LoadedModel) -> bool:
    """Create a complete empty store in a temporary sibling folder and move it into place atomically.

    Returns False (and leaves the existing store alone) when another worker moved its store into place first.
    """
    out = Path(opts.out)
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        create_arrays(group, layout)
        write_model_group(group, loaded)
        write_attrs(group, attrs)
        try:
            os.replace(tmp, out)
        except OSError:
            if (out / "zarr.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_plan(opts: ExtractOptions, loaded: LoadedModel, docs: Documents, n_layers: int) -> Plan:
    """The deterministic windows and stored layers of an extraction of ``docs`` (one window per item of a task)."""
    if isinstance(docs, TaskDocuments):
        return Plan(task_windows(loaded.tokenizer, docs.items, opts.seq_len, opts.max_tokens),
                    parse_layers(opts.layers, n_layers))
    return Plan(make_windows(tokenize_documents(loaded.tokenizer, docs), opts.seq_len,
                             bos_token_id(loaded.tokenizer), opts.max_tokens), parse_layers(opts.layers, n_layers))


def extract(opts: ExtractOptions, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Run (or resume) one extraction into ``opts.out`` (with ``loaded`` if given); returns the final attributes."""
    check_options(opts)
    sites = parse_sites(opts.sites)
    worker = Worker(opts.worker_index, opts.num_workers)
    resuming = check_destination(opts.out, opts.resume or worker.count > 1)
    existing = read_attrs(open_group(opts.out, "r")) if resuming else None
    device = str(resolve_device(opts.device))
    docs = load_documents(opts.data)
    loaded = loaded or load_model(opts.model, device=device, progress=opts.progress)
    arch = architecture_for(loaded.model)
    plan = make_plan(opts, loaded, docs, n_layers(loaded.model))
    if plan.n_tokens == 0:
        raise DepthcacheError(f"dataset {opts.data!r} tokenizes to no tokens")
    d_model = int(loaded.model.get_output_embeddings().weight.shape[1])
    chunk_tokens = opts.chunk_tokens or choose_chunk_tokens(len(plan.layers), d_model,
                                                            STORED_DTYPES[opts.dtype].itemsize)
    attrs = provenance(opts, loaded, docs.name, docs.sha256, len(docs.texts), plan, device, chunk_tokens)
    attrs["layout"]["num_workers"] = worker.count
    task = isinstance(docs, TaskDocuments)
    if task:
        attrs["dataset"] |= task_attrs(docs)
    if not existing:
        layout = StoreLayout(plan.n_tokens, plan.layers, d_model, opts.top_k, sites, opts.dtype, chunk_tokens, task)
        if not prepare_store(opts, attrs, layout, loaded):  # another worker created it first
            existing = read_attrs(open_group(opts.out, "r"))
    if existing:
        compare_identity(existing, attrs, opts.out)
        if existing["progress"]["complete"]:
            return existing
        attrs = existing
    return run_pipeline(opts, attrs, loaded, arch, plan, device, worker)


def finalize_store(out: str) -> dict[str, Any]:
    """``extract --finalize``: mark a store written by several workers complete, once all of them are done."""
    group = open_group(out, "r+")
    attrs = read_attrs(group)
    if attrs["progress"]["complete"]:
        return attrs
    return finalize(group, attrs, int(attrs["layout"].get("num_workers", 1)))


def run_pipeline(opts: ExtractOptions, attrs: dict[str, Any], loaded: LoadedModel, arch: Architecture, plan: Plan,
                 device: str, worker: Worker = Worker()) -> dict[str, Any]:
    """Forward in this thread, write in a background thread, joined by a bounded queue."""
    group = open_group(opts.out, "r+")
    chunk_tokens = int(attrs["layout"]["chunk_tokens"])
    todo = segments(worker, plan.n_tokens, chunk_tokens, batch_tokens(attrs), worker_done_until(group, worker))
    names = [n for n in group.array_keys() if n != "layer"]

    def commit(stop: int) -> None:
        if worker.count > 1:
            commit_worker(group, worker, stop)
        else:
            attrs["progress"] = {"tokens_committed": stop, "complete": stop == plan.n_tokens}
            write_attrs(group, attrs)

    start = todo[0][0] if todo else plan.n_tokens
    writer = ChunkWriter(group, names, chunk_tokens, plan.n_tokens, start, commit)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batches = planned_batches(loaded.model, arch, plan, opts, todo, pad_id, device)
    write_batches(writer, batches, sum(b - a for a, b in todo), opts)
    if worker.count > 1 and not unfinished_workers(group, attrs, worker.count):
        attrs = finalize(group, attrs, worker.count)
    return attrs


def planned_batches(model: torch.nn.Module, arch: Architecture, plan: Plan, opts: ExtractOptions,
                    todo: list[tuple[int, int]], pad_id: int, device: str
                    ) -> Iterator[tuple[int, dict[str, np.ndarray], torch.cuda.Event | None]]:
    """(first token, stored arrays, copy event) of each batch covering the token ranges ``todo``, run lazily."""
    for seg_start, seg_stop in todo:
        at = seg_start
        for first, last, drop, keep in batches_between(plan, seg_start, seg_stop, opts.batch_size):
            batch, copied = run_batch(model, arch, plan, opts, first, last, pad_id, device, drop)
            yield at, first_tokens(batch, keep), copied
            at += keep


def write_batches(writer: ChunkWriter, batches: Iterator[tuple[int, dict[str, np.ndarray], Any]], total: int,
                  opts: ExtractOptions, desc: str = "extract") -> None:
    """Run ``batches`` (the forward passes) in this thread and write them in a background thread, joined by a
    bounded queue; ``total`` tokens drive the progress named ``desc``."""
    pending: queue.Queue[tuple[int, dict[str, np.ndarray], Any] | None] = queue.Queue(maxsize=opts.queue_batches)
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            while (item := pending.get()) is not None:
                at, batch, copied = item
                if copied is not None:
                    copied.synchronize()
                writer.append(batch, at)
            writer.flush()
        except BaseException as exc:  # handed to the forward thread, which re-raises it
            failure.append(exc)
            while pending.get() is not None:
                pass

    thread = threading.Thread(target=drain, name="depthcache-writer", daemon=True)
    thread.start()
    bar = Progress(desc, total, "tok", opts.progress, every=MINUTE)
    try:
        for at, batch, copied in batches:
            pending.put((at, batch, copied))
            seconds = max(bar.clock() - bar.started, 1e-9)
            bar.note(f"{writer.bytes_written / seconds / 2**20:.0f} MB/s written")
            bar.update(len(batch["token_id"]))
            if failure:
                break
    finally:
        pending.put(None)
        thread.join()
        writer.close()
        bar.close()
    if failure:
        raise failure[0]
