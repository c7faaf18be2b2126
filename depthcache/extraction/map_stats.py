"""map-stats: stream two live models over the same token windows and accumulate the layer-map statistics
(depthcache.store.map_stats) batch by batch; no activation is written.

Windows are made as ``extract`` makes them (same data, ``--seq-len``, ``--max-tokens``) and run in the same fixed
batches, so the rows equal those of two stores extracted in float32 with the same options. Held-out windows (test,
then validation: whole windows drawn in a fixed hash order until ``test_tokens``/``val_tokens`` rows) keep their rows;
training windows only feed the sums. Checkpoints are taken at product-group boundaries (every
``checkpoint_minutes`` and at each learning-curve point), atomically: a killed run resumed with ``--resume`` forms
exactly the products an uninterrupted one does. Workers (``--worker-index``/``--num-workers``) take disjoint ranges
of whole batches into their own folders, which ``depthcache map-stats-merge`` sums.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthcache.errors import DepthcacheError
from depthcache.extraction.data import DEFAULT_DATASET, DataFields, load_documents
from depthcache.extraction.engine import batch_inputs, library_versions
from depthcache.extraction.preflight import available_memory
from depthcache.extraction.windows import Window, bos_token_id, make_windows, tokenize_documents
from depthcache.layerspec import parse_layers
from depthcache.model import Capture, LoadedModel, checked, load_model, resolve_device
from depthcache.model.placement import Placement, device_counts, main_device
from depthcache.progress import Progress
from depthcache.store.head import tokenizer_sha256
from depthcache.store.map_stats import (
    TEST,
    TRAIN,
    VAL,
    MapStats,
    Moments,
    Shift,
    create_stats,
    identity,
    load_stats,
    product_groups,
    read_stats_attrs,
    remove_stats,
    save_checkpoint,
    save_curve_point,
    shift_of,
    split_by_rows,
    sums_bytes,
    tokenization_files,
    window_rows,
)

GIB = 2**30
Batch = tuple[int, torch.Tensor, torch.Tensor]  # first window, both models' activations of one batch
SITE_NAMES = {"resid": "resid_pre", "attn": "attn_out", "mlp": "mlp_out"}


@dataclass
class MapStatsOptions:
    """Everything that decides what a map-stats run computes (and where it goes)."""

    out: str
    shallow: str
    deep: str
    data: str = DEFAULT_DATASET
    max_tokens: int | None = 65536
    seq_len: int = 512
    batch_size: int = 8
    layers: str = "all"        # shallow boundaries (L: the final residual)
    deep_layers: str = "all"   # deep boundaries
    site: str = "resid"
    test_tokens: int = 8192
    val_tokens: int = 4096
    include_first: bool = False
    product_rows: int = 4096
    curve_start: int = 1024    # learning-curve points at curve_start × 2^k training rows (0: none)
    checkpoint_minutes: float = 10.0
    device: str = "auto"
    accumulate_on: str = "auto"  # host (numpy float32 products) or device (torch); auto: device on CUDA
    products: str = "float32"  # the dtype products are formed in (summed in float64 either way)
    memory_gib: float | None = None  # budget for sums and rows (None: what the machine has left after the models)
    resume: bool = False
    worker_index: int = 0
    num_workers: int = 1
    progress: bool | None = None
    check: bool = True
    fields: DataFields = field(default_factory=DataFields)
    placement: Placement | None = None  # --device-map, --max-memory, --offload-folder, --model-dtype (both models)


@dataclass
class Pair:
    """The two loaded models, the boundaries mapped, and the windows both read."""

    shallow: LoadedModel
    deep: LoadedModel
    shallow_layers: tuple[int, ...]
    deep_layers: tuple[int, ...]
    windows: list[Window]
    widths: tuple[int, int]
    seq_len: int | None = None  # batches are padded to it, as extract pads them


# ------------------------------------------------------------------------------------------------ capturing

def boundary_layers(spec: str, n_layers: int, site: str) -> tuple[int, ...]:
    """The boundaries of a layer spec: for resid 0..L (L: the residual after the last layer), else 0..L-1."""
    return parse_layers(spec, n_layers + (site == "resid"))


def capture_rows(loaded: LoadedModel, layers: tuple[int, ...], site: str, ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """One forward pass: the (boundary, batch, seq, d) float32 activations of ``site`` at ``layers``."""
    structure, _ = checked(loaded.model, False)
    n = structure.n_layers
    inner = [layer for layer in layers if layer < n]
    where = main_device(loaded.model)  # a dispatched model takes its inputs on its first device
    with torch.inference_mode(), Capture(loaded.model, structure, inner, (site,), dtype=torch.float32,
                                         final=n in layers) as cap:
        loaded.model(input_ids=ids.to(where), attention_mask=mask.to(where), use_cache=False)
    parts = [cap.records[SITE_NAMES[site]][layer] for layer in inner]
    if n in layers:
        parts.append(cap.resid_final)
    return torch.stack([p.to(ids.device) for p in parts])  # a dispatched model's layers sit on several devices


def batch_rows(pair: Pair, site: str, first: int, last: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of windows first..last-1 for both models: (g, B, S, d) and (t, B, S, e), float32."""
    windows = pair.windows[first:last]
    pad = pair.deep.tokenizer.pad_token_id
    seq_len = max(len(w.tokens) for w in pair.windows) if pair.seq_len is None else pair.seq_len
    ids, mask = batch_inputs(windows, seq_len, 0 if pad is None else pad, device)
    return (capture_rows(pair.shallow, pair.shallow_layers, site, ids, mask),
            capture_rows(pair.deep, pair.deep_layers, site, ids, mask))


# --------------------------------------------------------------------------------------------- accumulating

class DeviceMoments:
    """Moments kept on the models' device (CUDA): float32 products summed into float64 there, copied out at
    checkpoints. The same sums as ``Moments.add`` up to float32 GEMM rounding (different kernels)."""

    def __init__(self, m: Moments, device: torch.device) -> None:
        self.n = m.n
        self.parts = {k: torch.from_numpy(np.ascontiguousarray(getattr(m, k))).to(device)
                      for k in ("sx", "gxx", "sy", "syy", "gxy")}

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows x (K, g, d) and y (K, t, e), already shifted."""
        k, g, d = x.shape
        yf = y.reshape(k, -1)
        self.n += k
        p = self.parts
        p["sx"] += x.sum(dim=0, dtype=torch.float64)
        p["sy"] += y.sum(dim=0, dtype=torch.float64)
        p["syy"] += y.double().square().sum(dim=(0, 2))
        for i in range(g):
            xi = x[:, i].contiguous()
            p["gxy"][i * d:(i + 1) * d] += (xi.T @ yf).double()
            p["gxx"][i] += (xi.T @ xi).double()

    def host(self) -> Moments:
        """The sums as numpy float64 (a copy)."""
        return Moments(self.n, *(self.parts[k].cpu().numpy().copy() for k in ("sx", "gxx", "sy", "syy", "gxy")))


class Accumulator:
    """The training sums of one run on the host (numpy, bit-equal to the store path) or on the device (torch)."""

    def __init__(self, m: Moments, device: torch.device | None) -> None:
        self.device = device
        self.host_sums = m if device is None else None
        self.device_sums = DeviceMoments(m, device) if device is not None else None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add shifted float32 rows (K, g, d) and (K, t, e)."""
        if self.device_sums is not None:
            self.device_sums.add(x, y)
        else:
            self.host_sums.add(x.cpu().numpy(), y.cpu().numpy())

    def moments(self) -> Moments:
        """The sums so far, float64 on the host."""
        return self.device_sums.host() if self.device_sums is not None else self.host_sums

    @property
    def n(self) -> int:
        """Training rows summed so far."""
        return self.device_sums.n if self.device_sums is not None else self.host_sums.n


# ------------------------------------------------------------------------------------------------- planning

def worker_range(n_windows: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """The windows worker ``index`` of ``count`` takes: a contiguous run of whole batches."""
    if not 0 <= index < count:
        raise DepthcacheError(f"--worker-index {index} must be in 0..{count - 1} (--num-workers {count})")
    batches = -(-n_windows // batch_size)
    first, last = batches * index // count, batches * (index + 1) // count
    return first * batch_size, min(last * batch_size, n_windows)


def required_bytes(g: int, d: int, t: int, e: int, opts: MapStatsOptions) -> int:
    """Host bytes a run needs beyond the models: the sums (and a copy when saving), the held-out rows, one product
    group of rows, one batch's activations."""
    width = 4 * (g * d + t * e)
    held = (opts.test_tokens + opts.val_tokens + 2 * opts.seq_len) * width
    batch = 2 * opts.batch_size * opts.seq_len * width
    return 2 * sums_bytes(g, d, t, e) + held + opts.product_rows * width + batch + 4 * d * t * e


def check_memory(g: int, d: int, t: int, e: int, opts: MapStatsOptions, device: str) -> None:
    """Refuse, before any forward pass, statistics that cannot fit, saying how many source layers would."""
    need = required_bytes(g, d, t, e, opts)
    have = int(opts.memory_gib * GIB) if opts.memory_gib else int(0.9 * available_memory("cpu"))
    if need <= have:
        return
    fit = max(0, max(k for k in range(g + 1) if required_bytes(k, d, t, e, opts) <= have or k == 0))
    raise DepthcacheError(
        f"the statistics of {g} shallow × {t} deep boundaries need {need / GIB:.1f} GiB (float64 sums: "
        f"{sums_bytes(g, d, t, e) / GIB:.1f} GiB, kept twice while saving), {have / GIB:.1f} GiB "
        f"{'allowed (--memory-gib)' if opts.memory_gib else 'left beside the models'}: at most {fit} shallow "
        "boundaries fit; split them with --layers into groups (one run each) or hold out fewer tokens")


def check_options(opts: MapStatsOptions) -> None:
    """Refuse option values that cannot work, before anything is loaded."""
    if opts.site not in SITE_NAMES:
        raise DepthcacheError(f"unknown --site {opts.site!r}; choose from {', '.join(SITE_NAMES)}")
    if opts.accumulate_on not in ("auto", "host", "device"):
        raise DepthcacheError("--accumulate-on must be auto, host or device")
    if opts.products not in ("float32", "float64"):
        raise DepthcacheError("--products must be float32 (fast) or float64 (exact products)")
    for name in ("seq_len", "batch_size", "product_rows", "test_tokens", "val_tokens"):
        if getattr(opts, name) < 1:
            raise DepthcacheError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.curve_start < 0 or opts.checkpoint_minutes < 0:
        raise DepthcacheError("--curve-start and --checkpoint-minutes must not be negative")


def same_tokenizer(shallow: LoadedModel, deep: LoadedModel) -> None:
    """Refuse two models whose tokenizers turn text into different ids (chat templates aside)."""
    a, b = (tokenization_files(m.tokenizer_files) for m in (shallow, deep))
    if a != b:
        names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise DepthcacheError(f"the models' tokenizers differ ({', '.join(names)}): layer maps need two models with "
                              "the same tokenizer")


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """What the statistics record of a model: its name, weights fingerprint and depth."""
    p = loaded.provenance
    structure, _ = checked(loaded.model, False)
    return {"name": p.get("display_name") or p.get("spec"), "spec": p.get("spec"),
            "weights_sha256": p.get("weights_sha256"), "n_layers": structure.n_layers,
            "architecture": p.get("architecture")}


def run_attrs(opts: MapStatsOptions, pair: Pair, docs_name: str, docs_sha: str, rows: np.ndarray,
              split: np.ndarray, window_range: tuple[int, int], device: str) -> dict[str, Any]:
    """Provenance and parameters of a run (the identity a resume and a merge check)."""
    return {
        "shallow": model_record(pair.shallow), "deep": model_record(pair.deep),
        "tokenizer_sha256": tokenizer_sha256(pair.deep.tokenizer_files),
        "dataset": {"name": docs_name, "sha256": docs_sha}, "seq_len": opts.seq_len, "max_tokens": opts.max_tokens,
        "site": opts.site, "shallow_layers": list(pair.shallow_layers), "deep_layers": list(pair.deep_layers),
        "include_first": bool(opts.include_first),
        "split": {"rule": "whole windows in hash order ((window * 0x9E3779B1) mod 2**32): test until test_tokens "
                          "rows, then validation until val_tokens rows, the rest training",
                  "test_tokens": opts.test_tokens, "val_tokens": opts.val_tokens,
                  "windows": {"train": int((split == TRAIN).sum()), "validation": int((split == VAL).sum()),
                              "test": int((split == TEST).sum())},
                  "rows": {"train": int(rows[split == TRAIN].sum()), "validation": int(rows[split == VAL].sum()),
                           "test": int(rows[split == TEST].sum())}},
        "product_rows": opts.product_rows, "curve_start": opts.curve_start,
        "accumulation": f"{opts.products} products, float64 sums", "n_windows": len(pair.windows),
        "worker": {"index": opts.worker_index, "count": opts.num_workers, "windows": list(window_range)},
        "batch_size": opts.batch_size, "device": device, "versions": library_versions(),
        "placement": {role: {"model_dtype": str(next(m.model.parameters()).dtype).removeprefix("torch."),
                             "device_map": device_counts(m.model)}
                      for role, m in (("shallow", pair.shallow), ("deep", pair.deep))},
        "created": datetime.now(timezone.utc).isoformat(), "source": "live models"}


def plan_text(pair: Pair, attrs: dict[str, Any], opts: MapStatsOptions, need: int) -> str:
    """The plan printed before the first forward pass (models, tokens, split, pairs, memory, checkpoints)."""
    s = attrs["split"]["rows"]
    g, t = len(pair.shallow_layers), len(pair.deep_layers)
    first, last = attrs["worker"]["windows"]
    curve = f"curve points at {opts.curve_start:,} × 2^k training tokens" if opts.curve_start else "no curve"
    return (f"map-stats: {attrs['shallow']['name']} ({attrs['shallow']['n_layers']} layers) → "
            f"{attrs['deep']['name']} ({attrs['deep']['n_layers']} layers), site {opts.site}; "
            f"{len(pair.windows):,} windows of ≤ {opts.seq_len} tokens (this run: windows {first:,}-{last - 1:,}); "
            f"rows: {s['train']:,} training, {s['validation']:,} validation, {s['test']:,} test; {g} × {t} pairs; "
            f"~{need / GIB:.1f} GiB for sums and rows; checkpoint every {opts.checkpoint_minutes:g} min; {curve}")


def load_pair(opts: MapStatsOptions, device: str) -> tuple[Pair, Any]:
    """Both models loaded and checked, their tokenizers compared, the windows made and the boundaries parsed."""
    docs = load_documents(opts.data, opts.fields)
    shallow, deep = (load_model(spec, device=device, progress=opts.progress, check=opts.check,
                                placement=opts.placement) for spec in (opts.shallow, opts.deep))
    same_tokenizer(shallow, deep)
    windows = make_windows(tokenize_documents(deep.tokenizer, docs), opts.seq_len, bos_token_id(deep.tokenizer),
                           opts.max_tokens)
    if not windows:
        raise DepthcacheError(f"dataset {opts.data!r} tokenizes to no tokens")
    ns, nd = (checked(m.model, False)[0].n_layers for m in (shallow, deep))
    widths = tuple(int(m.model.get_output_embeddings().weight.shape[1]) for m in (shallow, deep))
    pair = Pair(shallow, deep, boundary_layers(opts.layers, ns, opts.site),
                boundary_layers(opts.deep_layers, nd, opts.site), windows, widths, opts.seq_len)
    return pair, docs


# ------------------------------------------------------------------------------------------------------ running

@dataclass
class RunState:
    """Where a run stands: sums, held-out rows gathered, next window, products formed."""

    sums: Accumulator
    shift: Shift | None
    held: dict[int, tuple[np.ndarray, np.ndarray]]  # window -> rows (g, K, d), (t, K, e)
    next_window: int
    products: int


def held_arrays(state: RunState, g: int, d: int, t: int, e: int, split: np.ndarray, before: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The held-out rows of windows before ``before``, in window order: x (g, n, d), y (t, n, e), window, split."""
    keys = sorted(w for w in state.held if w < before)
    if not keys:
        return (np.zeros((g, 0, d), np.float32), np.zeros((t, 0, e), np.float32), np.zeros(0, np.int64),
                np.zeros(0, np.int8))
    x = np.concatenate([state.held[w][0] for w in keys], axis=1)
    y = np.concatenate([state.held[w][1] for w in keys], axis=1)
    window = np.concatenate([np.full(state.held[w][0].shape[1], w, np.int64) for w in keys])
    return x, y, window, split[window].astype(np.int8)


def checkpoint(path: Path, state: RunState, attrs: dict[str, Any], split: np.ndarray, window_range: tuple[int, int],
               complete: bool) -> None:
    """Save the sums, held-out rows and progress atomically."""
    m = state.sums.moments()
    g, d = state.shift.x.shape
    t, e = state.shift.y.shape
    x, y, window, role = held_arrays(state, g, d, t, e, split, state.next_window)
    progress = {"next_window": state.next_window, "products": state.products, "complete": complete,
                "ranges": [list(window_range)] if complete else []}
    save_checkpoint(path, MapStats(attrs, state.shift, m, x, y, window, role, progress))


def resumed_state(path: Path, attrs: dict[str, Any], accumulate: torch.device | None,
                  window_range: tuple[int, int]) -> RunState | None:
    """The state of the last checkpoint of a run with the same identity (None when there is none yet)."""
    if not (path / "sums").is_dir():
        return None
    old = read_stats_attrs(path)
    diffs = [k for k, v in identity(attrs).items() if identity(old).get(k) != v]
    if diffs or old.get("worker", {}).get("windows") != list(window_range):
        raise DepthcacheError(f"{path} was computed with other {', '.join(diffs) or 'worker ranges'}; refusing to mix "
                              "them: choose a new --out")
    stats = load_stats(path, lazy_rows=False)
    held = {}
    for w in np.unique(stats.heldout_window):
        rows = stats.heldout_window == w
        held[int(w)] = (np.ascontiguousarray(stats.heldout_x[:, rows]), np.ascontiguousarray(stats.heldout_y[:, rows]))
    return RunState(Accumulator(stats.train, accumulate), stats.shift, held, int(stats.progress["next_window"]),
                    int(stats.progress["products"]))


def window_slices(pair: Pair, first_row: int, a: torch.Tensor, b: torch.Tensor, row: int, w: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of window ``w`` (batch row ``row``) from position ``first_row`` on: (K, g, d) and (K, t, e)."""
    length = len(pair.windows[w].tokens)
    return (a[:, row, first_row:length].transpose(0, 1).contiguous(),
            b[:, row, first_row:length].transpose(0, 1).contiguous())


def shift_from(pair: Pair, opts: MapStatsOptions, rows: np.ndarray, device: str) -> tuple[Shift, Batch]:
    """The mean of the first window with rows (as its batch computes it): one fixed vector per boundary, the same
    for every worker and for the stores of the same windows; also that batch (worker 0 starts with it)."""
    w = int(np.flatnonzero(rows > 0)[0])
    start = (w // opts.batch_size) * opts.batch_size
    a, b = batch_rows(pair, opts.site, start, min(start + opts.batch_size, len(pair.windows)), device)
    x, y = window_slices(pair, 0 if opts.include_first else 1, a, b, w - start, w)
    return shift_of(x.cpu().numpy(), y.cpu().numpy()), (start, a, b)


def map_stats(opts: MapStatsOptions) -> Path:
    """Run (or resume) one map-stats job into ``opts.out``; returns the folder."""
    check_options(opts)
    out = Path(opts.out)
    if out.exists() and not opts.resume:
        raise DepthcacheError(f"{out} exists: pass --resume to continue it, or choose a new --out")
    if out.exists():
        read_stats_attrs(out)  # refuse a folder that is not a statistics folder before loading models
    device = str(resolve_device(opts.device))
    pair, docs = load_pair(opts, device)
    rows = window_rows([len(w.tokens) for w in pair.windows], opts.include_first)
    split = split_by_rows(rows, opts.test_tokens, opts.val_tokens)
    window_range = worker_range(len(pair.windows), opts.batch_size, opts.worker_index, opts.num_workers)
    g, t = len(pair.shallow_layers), len(pair.deep_layers)
    (d, e) = pair.widths
    check_memory(g, d, t, e, opts, device)
    attrs = run_attrs(opts, pair, docs.name, docs.sha256, rows, split, window_range, device)
    accumulate = torch.device(device) if (opts.accumulate_on == "device" or (
        opts.accumulate_on == "auto" and device.startswith("cuda"))) else None
    state = resumed_state(out, attrs, accumulate, window_range) if out.exists() else None
    computed = None
    if state is not None and state.next_window >= window_range[1] and load_stats(out).progress.get("complete"):
        return out
    progress_stream = Progress("map-stats", int(rows[window_range[0]:window_range[1]].sum()), "tok", opts.progress,
                               every=60.0)
    print(plan_text(pair, attrs, opts, required_bytes(g, d, t, e, opts)), file=progress_stream.stream, flush=True)
    if state is None:
        if out.exists():
            remove_stats(out)
        create_stats(out, attrs)
        shift, computed = shift_from(pair, opts, rows, device)
        state = RunState(Accumulator(Moments.zeros(g, d, t, e), accumulate), shift, {}, window_range[0], 0)
    with progress_stream as bar:
        bar.update(int(rows[window_range[0]:state.next_window].sum()))
        run_windows(pair, opts, out, state, attrs, split, rows, window_range, device, bar, computed)
    return out


def run_windows(pair: Pair, opts: MapStatsOptions, out: Path, state: RunState, attrs: dict[str, Any],
                split: np.ndarray, rows: np.ndarray, window_range: tuple[int, int], device: str,
                bar: Progress, computed: Batch | None = None) -> None:
    """Forward both models batch by batch from the state's next window; sums per product group, held-out rows
    kept, checkpoints at product boundaries."""
    first_row = 0 if opts.include_first else 1
    lo, hi = window_range
    training = [w for w in range(lo, hi) if split[w] == TRAIN]
    groups = product_groups(rows[training], opts.product_rows, opts.curve_start)
    ends = {training[b - 1]: (p, point) for p, (_, b, point) in enumerate(groups)}
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    dtype = torch.float64 if opts.products == "float64" else torch.float32
    shift_x = torch.from_numpy(state.shift.x).to(device, dtype)
    shift_y = torch.from_numpy(state.shift.y).to(device, dtype)
    last_save = time.monotonic()
    clock, summing = time.perf_counter(), 0.0
    for start in batch_starts(state.next_window, hi, opts.batch_size):
        stop = min(start + opts.batch_size, hi)
        a, b = computed[1:] if computed and computed[0] == start else batch_rows(pair, opts.site, start, stop, device)
        computed = None
        for w in range(max(start, state.next_window), stop):
            x, y = window_slices(pair, first_row, a, b, w - start, w)
            bar.update(int(rows[w]))
            if split[w] in (VAL, TEST):
                state.held[w] = (x.transpose(0, 1).cpu().numpy().copy(), y.transpose(0, 1).cpu().numpy().copy())
                continue
            if split[w] != TRAIN:
                continue
            pending.append((x, y))
            if w not in ends:
                continue
            tick = time.perf_counter()
            state.sums.add(torch.cat([p[0] for p in pending]).to(dtype) - shift_x,
                           torch.cat([p[1] for p in pending]).to(dtype) - shift_y)
            summing += time.perf_counter() - tick
            pending.clear()
            state.products, state.next_window = ends[w][0] + 1, w + 1
            if ends[w][1]:
                save_curve_point(out, state.sums.moments(), (*state.shift.x.shape, *state.shift.y.shape))
            if ends[w][1] or (time.monotonic() - last_save) >= 60 * opts.checkpoint_minutes:
                checkpoint(out, state, attrs, split, window_range, complete=False)
                last_save = time.monotonic()
        bar.note(f"{state.sums.n:,} training rows summed")
    state.next_window = hi
    attrs["seconds"] = round(time.perf_counter() - clock, 3)  # this session's (a resumed run: since the resume)
    attrs["accumulate_seconds"] = round(summing, 3)
    checkpoint(out, state, attrs, split, window_range, complete=True)


def batch_starts(first: int, last: int, batch_size: int) -> Iterator[int]:
    """First window of each fixed batch (multiples of ``batch_size``) holding windows first..last-1."""
    return iter(range((first // batch_size) * batch_size, last, batch_size))
