"""Intervention runs: forward passes with layers skipped, stored under ``runs/<name>`` beside the baseline.

Skipping layer s makes it contribute nothing to the residual: forward hooks zero what its branches add (the
attention and MLP outputs; OLMo 2's post-norm outputs), so the layer returns its input; ``attn``/``mlp`` zero one
branch. Position 0 is never skipped. Variants (docs/interventions.md): ``current`` skips positions 1..T−1 of every window;
``future`` skips positions 1..t−1 for up to 4 drawn t per window (every 8th position, ≥ 8 from both ends), one
pass per draw, and skip-effects measures positions ≥ t only.

A run covers the first N baseline tokens (whole baseline chunks) with the baseline's exact batches (same shapes),
and stores only what skip-effects needs: ``attn_out``/``mlp_out`` of the stored layers ≥ the first skipped one
(earlier layers are unchanged), ``resid_final`` (with the store's ``model/`` head it gives the whole output
distribution), the output summary, the token columns and, in the future variant, ``skip_stop`` (t of the
token's window in its draw; 0: nothing skipped or measured). With ``prefix="baseline"`` the layers before the
first skipped one are not run at all: the baseline's stored ``resid_pre`` is fed into it instead.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from depthcache.errors import DepthcacheError, Interrupted
from depthcache.extraction.data import load_documents
from depthcache.extraction.engine import (
    TORCH_DTYPES,
    Batch,
    ExtractOptions,
    Plan,
    batch_inputs,
    batches_between,
    check_destination,
    check_options,
    copied_event,
    extract,
    first_tokens,
    library_versions,
    make_plan,
    output_summary,
    to_host,
    token_columns,
    write_batches,
)
from depthcache.extraction.interrupts import interrupted_message, stop_on_signals
from depthcache.extraction.preflight import load_fitted
from depthcache.extraction.writer import ChunkWriter, resume_point
from depthcache.model import (
    Capture,
    LoadedModel,
    Skip,
    Structure,
    checked,
    main_device,
    only_layers,
    structure_of,
)
from depthcache.progress import Progress
from depthcache.store.head import tokenizer_sha256
from depthcache.store.identity import differences
from depthcache.store.io import open_group, read_attrs, replace_atomically, write_attrs
from depthcache.store.layout import (
    SCHEMA_VERSION,
    StoreLayout,
    create_array,
    create_arrays,
)

SUBLAYERS = ("layer", "attn", "mlp")  # or one branch module's path in the branch table (schema 2.2)
BRANCH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,200}")
VARIANTS = ("current", "future")
PREFIXES = ("baseline", "recompute")
FUTURE_DRAWS = 4
FUTURE_STEP = 8
MATCHING = ("intervention", "options.layers", "options.sites", "options.dtype", "layout.n_tokens")


@dataclass(frozen=True)
class SkipOptions:
    """What ``extract --skip`` adds to the baseline's options."""

    skip: str
    sublayer: str = "layer"
    tokens: int | None = 4096  # None: every baseline token
    variant: str = "current"
    prefix: str = "baseline"
    seed: int = 0


@dataclass(frozen=True)
class SkipRun:
    """One intervention run: the layers skipped together, the branch skipped and the variant."""

    layers: tuple[int, ...]
    sublayer: str = "layer"
    variant: str = "current"

    @property
    def name(self) -> str:
        """Group name under ``runs/``: skip_7, skip_3+7, skip_7_attn, skip_7_future, ..."""
        return "_".join(["skip", "+".join(map(str, self.layers))]
                        + [self.sublayer] * (self.sublayer != "layer") + [self.variant] * (self.variant != "current"))

    @property
    def draws(self) -> int:
        """Passes over the tokens: one per drawn position t in the future variant."""
        return FUTURE_DRAWS if self.variant == "future" else 1


@dataclass
class RunContext:
    """Everything the batches of one skip run need."""

    loaded: LoadedModel
    structure: Structure
    plan: Plan
    opts: ExtractOptions  # the baseline's options (same batches, dtype, top-k)
    run: SkipRun
    stored: tuple[int, ...]
    tokens: int
    device: str
    prefix: zarr.Array | None  # the baseline's resid_pre, when layers before the skip are not recomputed
    prefix_index: int
    stops: np.ndarray | None  # (draws, windows) first measured position in the future variant

    @property
    def pad_id(self) -> int:
        """Padding id of the batches (as the baseline used)."""
        pad = self.loaded.tokenizer.pad_token_id
        return 0 if pad is None else pad


def parse_skip(spec: str, n_layers: int) -> list[tuple[int, ...]]:
    """'7', '3,7' (two runs), '3+7' (one run skipping both), 'each', 'range 20-29' → the layer sets of the runs."""
    text = spec.strip()
    if text == "each":
        return [(layer,) for layer in range(n_layers)]
    if text.startswith("range"):
        lo, _, hi = text.removeprefix("range").strip(" :").partition("-")
        first, last = layer_index(lo, spec, n_layers), layer_index(hi, spec, n_layers)
        if first > last:
            raise DepthcacheError(f"--skip {spec!r}: the range must go upwards, e.g. 'range 20-29'")
        return [(layer,) for layer in range(first, last + 1)]
    sets: dict[tuple[int, ...], None] = {}
    for part in text.split(","):
        sets[tuple(sorted({layer_index(p, spec, n_layers) for p in part.split("+")}))] = None
    return list(sets)


def layer_index(text: str, spec: str, n_layers: int) -> int:
    """One layer number of a --skip spec, checked against the model's depth."""
    try:
        layer = int(text.strip())
    except ValueError as exc:
        raise DepthcacheError(f"bad --skip {spec!r}: use e.g. 7, '3,7' (two runs), '3+7' (one run skipping both), "
                              "each, or 'range 20-29'") from exc
    if not 0 <= layer < n_layers:
        raise DepthcacheError(f"--skip {spec!r}: layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    return layer


def check_skip_options(skip: SkipOptions) -> None:
    """Refuse bad intervention options before anything is loaded."""
    if not BRANCH_NAME.fullmatch(skip.sublayer):
        raise DepthcacheError(f"unknown --skip-sublayer {skip.sublayer!r}; choose from {', '.join(SUBLAYERS)} or a "
                              "branch module of the model (e.g. mamba)")
    for name, value, allowed in (("variant", skip.variant, VARIANTS), ("prefix", skip.prefix, PREFIXES)):
        if value not in allowed:
            raise DepthcacheError(f"unknown --skip-{name} {value!r}; choose from {', '.join(allowed)}")
    if skip.tokens is not None and skip.tokens < 1:
        raise DepthcacheError("--skip-tokens must be at least 1")


def run_tokens(requested: int | None, chunk_tokens: int, n_tokens: int) -> int:
    """Baseline tokens a run covers: the request rounded up to whole chunks, at most every baseline token."""
    if requested is None:
        return n_tokens
    if requested > n_tokens:
        raise DepthcacheError(f"--skip-tokens {requested} is more than the baseline's {n_tokens} tokens: ask for "
                              f"at most {n_tokens}, or extract a larger baseline (--max-tokens)")
    return min(-(-requested // chunk_tokens) * chunk_tokens, n_tokens)


def future_stops(plan: Plan, seed: int) -> np.ndarray:
    """(draws, windows) position t per window and draw: distinct multiples of 8 in [8, len − 8], seeded (0: none)."""
    stops = np.zeros((FUTURE_DRAWS, len(plan.windows)), dtype=np.int32)
    for seq in range(len(plan.windows)):
        n = len(plan.windows[seq].tokens)
        candidates = np.arange(FUTURE_STEP, n - FUTURE_STEP + 1, FUTURE_STEP)
        picked = np.random.default_rng([seed, seq]).permutation(candidates)[:FUTURE_DRAWS]
        stops[:len(picked), seq] = np.sort(picked)
    return stops


def skip_mask(ctx: RunContext, draw: int, first: int, last: int, real: torch.Tensor) -> torch.Tensor:
    """(batch, seq) positions where the run skips: 1..T−1 (current) or 1..t−1 of the draw's t (future)."""
    pos = torch.arange(real.shape[1], device=real.device).unsqueeze(0)
    if ctx.stops is None:
        return real & (pos >= 1)
    stop = torch.from_numpy(ctx.stops[draw, first:last]).to(real.device).unsqueeze(1)
    return real & (pos >= 1) & (pos < stop)


def baseline_residual(ctx: RunContext, first: int, last: int, real: torch.Tensor) -> torch.Tensor:
    """(batch, seq, d) baseline residual entering the first skipped layer (zeros past the run's tokens)."""
    begin, end = int(ctx.plan.offsets[first]), min(int(ctx.plan.offsets[last]), ctx.tokens)
    values = np.asarray(ctx.prefix[ctx.prefix_index, begin:end]).astype(np.float32)
    dtype = next(ctx.loaded.model.parameters()).dtype
    hidden = torch.zeros((real.numel(), values.shape[-1]), dtype=dtype)
    hidden[real.flatten().cpu().nonzero().squeeze(1)[:end - begin]] = torch.from_numpy(values).to(dtype)
    return hidden.view(*real.shape, -1).to(ctx.device)


def skip_batch(ctx: RunContext, draw: int, first: int, last: int, drop: int
               ) -> tuple[dict[str, np.ndarray], torch.cuda.Event | None]:
    """Forward windows first..last-1 with the run's skip and return its stored arrays (minus the first ``drop``)."""
    model, opts = ctx.loaded.model, ctx.opts
    ids, mask = batch_inputs(ctx.plan.windows[first:last], opts.seq_len, ctx.pad_id, ctx.device)
    host = token_columns(ctx.plan, first, last)
    real = mask.bool()
    keep = real.flatten().nonzero().squeeze(1)[drop:]

    def rows(t: torch.Tensor) -> torch.Tensor:
        """(..., batch, seq, d) → (..., real tokens after ``drop``, d)."""
        return t.flatten(-3, -2).index_select(-2, keep)

    dtype = TORCH_DTYPES[opts.dtype]
    with ExitStack() as stack, torch.inference_mode():
        stack.enter_context(Skip(model, ctx.structure, ctx.run.layers, ctx.run.sublayer,
                                 skip_mask(ctx, draw, first, last, real)))
        cap = stack.enter_context(Capture(model, ctx.structure, ctx.stored, ctx.structure.roles, dtype, final=True))
        if ctx.prefix is not None:
            later = list(range(min(ctx.run.layers), ctx.structure.n_layers))
            stack.enter_context(only_layers(model, ctx.structure, later, baseline_residual(ctx, first, last, real)))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = {f"{role}_out": to_host(rows(cap.stacked(f"{role}_out")), opts.dtype) for role in ctx.structure.roles}
        out["resid_final"] = to_host(rows(cap.resid_final), opts.dtype)
        next_ids = torch.from_numpy(host["next_token_id"][drop:]).long().to(ctx.device)
        summary = output_summary(rows(logits), next_ids, opts.top_k)
    out.update({k: to_host(v) for k, v in summary.items()})
    out.update({k: v[drop:] for k, v in host.items()})
    if ctx.stops is not None:
        lengths = np.diff(ctx.plan.offsets[first:last + 1])
        out["skip_stop"] = np.repeat(ctx.stops[draw, first:last], lengths)[drop:]
    return out, copied_event(ctx.device)


def run_batches(ctx: RunContext, start: int) -> Iterator[Batch]:
    """(run token, stored arrays, copy event, no buffers to release) of each batch from run token ``start`` on; draw
    k holds run tokens
    k·N .. (k+1)·N − 1 for baseline tokens 0 .. N − 1."""
    for draw in range(start // ctx.tokens, ctx.run.draws):
        begin = max(start - draw * ctx.tokens, 0)
        at = draw * ctx.tokens + begin
        for first, last, drop, keep in batches_between(ctx.plan, begin, ctx.tokens, ctx.opts.batch_size):
            batch, copied = skip_batch(ctx, draw, first, last, drop)
            yield at, first_tokens(batch, keep), copied, None
            at += keep


def run_attrs(base: dict[str, Any], run: SkipRun, stored: tuple[int, ...], tokens: int, windows: int,
              skip: SkipOptions, prefix: str, device: str) -> dict[str, Any]:
    """The attributes of a new run group: the baseline's provenance, the run's layout and its intervention."""
    return {**base, "schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            "options": {**base["options"], "sites": list(run_sites(base)), "layers": list(stored), "device": device},
            "layout": run_layout(base, run.draws * tokens, run.draws * windows),
            "progress": {"tokens_committed": 0, "complete": False},
            "intervention": {"kind": "skip", "layers": list(run.layers), "sublayer": run.sublayer,
                             "variant": run.variant, "baseline_tokens": tokens, "draws": run.draws, "seed": skip.seed,
                             "prefix": prefix, "baseline_created": base["created"]}}


def run_layout(base: dict[str, Any], n_tokens: int, n_windows: int) -> dict[str, Any]:
    """A run's layout attributes: the baseline's chunks; sharded like the baseline (2.0), its token shards no longer
    than the run."""
    chunk = int(base["layout"]["chunk_tokens"])
    layout = {"n_tokens": n_tokens, "n_windows": n_windows, "chunk_tokens": chunk}
    if "token_shard_tokens" in base["layout"]:
        shard = int(base["layout"]["token_shard_tokens"])
        layout["token_shard_tokens"] = min(shard, -(-n_tokens // chunk) * chunk)
    return layout


def flat(attrs: dict[str, Any], key: str) -> Any:
    """``attrs['a']['b']`` for key 'a.b'."""
    for part in key.split("."):
        attrs = attrs[part]
    return attrs


def existing_run(out: str, name: str, attrs: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The attributes of run ``name`` if it exists and may be continued; refuses clobbering or mixing settings."""
    if not (Path(out) / "runs" / name / "zarr.json").exists():
        return None
    if not resume:
        raise DepthcacheError(f"{out} already has run {name!r}: pass --resume to continue it (same settings)")
    existing = read_attrs(open_group(out, "r", path=f"runs/{name}"))
    diffs = [f"  {k}: store has {flat(existing, k)!r}, this run has {flat(attrs, k)!r}" for k in MATCHING
             if flat(existing, k) != flat(attrs, k)]
    if diffs:
        raise DepthcacheError(f"run {name!r} in {out} was made with other settings; refusing to mix them:\n"
                              + "\n".join(diffs))
    return existing


def create_run(out: str, name: str, attrs: dict[str, Any]) -> None:
    """Create the run's empty arrays in a temporary sibling of the store, then move it to runs/<name> atomically."""
    n, chunk, dtype = attrs["layout"]["n_tokens"], attrs["layout"]["chunk_tokens"], attrs["options"]["dtype"]
    d_model = attrs["model"]["d_model"]
    stored = tuple(attrs["options"]["layers"])
    zarr.open_group(out, mode="r+").require_group("runs")
    tmp = Path(out).with_name(f".{Path(out).name}.{name}.creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        layout = StoreLayout(n, stored, d_model, attrs["options"]["top_k"], run_sites(attrs), dtype, chunk,
                             task="task" in attrs["dataset"],
                             token_shard_tokens=attrs["layout"].get("token_shard_tokens"))
        create_arrays(group, layout)
        create_array(group, "resid_final", layout)
        if attrs["intervention"]["variant"] == "future":
            create_array(group, "skip_stop", layout)
        write_attrs(group, attrs)
        replace_atomically(tmp, Path(out) / "runs" / name)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DepthcacheError(f"cannot create run {name!r} in {out}: {exc.strerror or exc}; nothing was left "
                                  "behind: fix that and run again") from exc
        raise


def execute_run(ctx: RunContext, out: str, name: str, attrs: dict[str, Any], resume_from: dict[str, Any] | None
                ) -> dict[str, Any]:
    """Create (or continue) one run group and write its batches, committing progress per chunk."""
    if resume_from is None:
        create_run(out, name, attrs)
    else:
        attrs = resume_from
        if attrs["progress"]["complete"]:
            return attrs
    group = open_group(out, "r+", path=f"runs/{name}")
    n_tokens, chunk_tokens = int(attrs["layout"]["n_tokens"]), int(attrs["layout"]["chunk_tokens"])
    start = resume_point(int(attrs["progress"]["tokens_committed"]), chunk_tokens, n_tokens)

    def commit(stop: int) -> None:
        attrs["progress"] = {"tokens_committed": stop, "complete": stop == n_tokens}
        write_attrs(group, attrs)

    writer = ChunkWriter(group, None, chunk_tokens, n_tokens, start, commit)
    write_batches(writer, run_batches(ctx, start), n_tokens - start, ctx.opts, desc=f"run {name}")
    return attrs


def run_sites(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The branch sites a skip run stores: the baseline's (attn and mlp, or only the roles its model has)."""
    return tuple(site for site in ("attn", "mlp") if site in attrs["options"]["sites"])


def check_baseline(attrs: dict[str, Any], loaded: LoadedModel, docs_sha: str, out: str) -> None:
    """Refuse a baseline made from another model or dataset, or lacking what skip runs compare with."""
    model = attrs["model"]
    ours = {"model": {**loaded.provenance, "tokenizer_sha256": tokenizer_sha256(loaded.tokenizer_files)},
            "dataset": {"sha256": docs_sha}, "options": {}, "layout": {}}
    diffs = differences(attrs, ours, ("model", "tokenizer", "data"))
    if diffs:
        raise DepthcacheError(f"{out} was extracted with another model, tokenizer or data:\n" + "\n".join(diffs) +
                              f"\n(store: model "
                              f"{model['spec']!r}, data {attrs['dataset']['spec']!r}): pass the baseline's --model "
                              "and --data")
    missing = sorted({"resid", *structure_of(loaded.model).roles} - set(attrs["options"]["sites"]))
    if missing:
        raise DepthcacheError(f"{out} lacks the sites {', '.join(missing)}: skip runs are compared with the baseline's "
                              "attn_out, mlp_out and resid_final; re-extract it with --sites resid,attn,mlp")


def baseline_options(opts: ExtractOptions, attrs: dict[str, Any]) -> ExtractOptions:
    """The extraction options the baseline was made with (a run reuses its batches, dtype and top-k)."""
    o = attrs["options"]
    return replace(opts, sites=tuple(o["sites"]), layers=",".join(map(str, o["layers"])), max_tokens=o["max_tokens"],
                   seq_len=o["seq_len"], batch_size=o["batch_size"], dtype=o["dtype"], top_k=o["top_k"],
                   chunk_tokens=attrs["layout"]["chunk_tokens"])


def check_tokens(root: zarr.Group, attrs: dict[str, Any], plan: Plan, tokens: int, out: str) -> None:
    """Refuse a run over baseline tokens that are not committed, or that differ from this dataset's tokens."""
    committed = int(attrs["progress"]["tokens_committed"])
    if committed < tokens:
        raise DepthcacheError(f"{out} has {committed:,} committed baseline tokens but the skip run needs the first "
                              f"{tokens:,}: finish the baseline first (depthcache extract --resume with its options) "
                              "or ask for fewer --skip-tokens")
    ours = np.concatenate([w.tokens for w in plan.windows])[:tokens]
    if not np.array_equal(ours, root["token_id"][:tokens]):
        raise DepthcacheError(f"the tokens of {out} differ from this dataset's tokenization: extract the skip runs "
                              "with the library versions and tokenizer of the baseline")


def extract_skips(opts: ExtractOptions, skip: SkipOptions, loaded: LoadedModel | None = None
                  ) -> dict[str, dict[str, Any]]:
    """``extract --skip``: the baseline first (created, or continued with --resume), then every skip run (with
    ``loaded`` if given); returns each run's name and final attributes. SIGINT and SIGTERM stop it at the last
    committed chunk of the run being written and raise Interrupted (resume with --resume)."""
    with stop_on_signals():
        try:
            return extract_skip_runs(opts, skip, loaded)
        except Interrupted as exc:
            raise Interrupted(exc.signum, interrupted_message(exc.signum, opts.out)) from None


def extract_skip_runs(opts: ExtractOptions, skip: SkipOptions, loaded: LoadedModel | None = None
                      ) -> dict[str, dict[str, Any]]:
    """The body of ``extract_skips``."""
    check_options(opts)
    check_skip_options(skip)
    if opts.num_workers > 1:
        raise DepthcacheError("skip runs are extracted by one worker: drop --num-workers")
    exists = Path(opts.out).exists()
    if exists and not (Path(opts.out) / "zarr.json").exists():
        raise DepthcacheError(f"{opts.out} exists and is not a depthcache store; refusing to write into it")
    if not exists:
        check_destination(opts.out, resume=False)
    docs = load_documents(opts.data, opts.fields)
    loaded = loaded or load_fitted(opts.model, opts.device, opts.placement, opts.progress, opts.check)
    device = main_device(loaded.model)
    structure, _ = checked(loaded.model, opts.check)
    depth = structure.n_layers
    runs = [SkipRun(layers, skip.sublayer, skip.variant) for layers in parse_skip(skip.skip, depth)]
    if skip.sublayer not in SUBLAYERS:  # one branch module: every skipped layer must have it
        for run in runs:
            for layer in run.layers:
                structure.branch_part(skip.sublayer, layer)
    if not exists:
        run_tokens(skip.tokens, 1, make_plan(opts, loaded, docs, depth).n_tokens)  # refuse before writing
    if not exists or opts.resume:
        extract(opts, loaded)
    root = open_group(opts.out, "r")
    base = read_attrs(root)
    check_baseline(base, loaded, docs.sha256, opts.out)
    base_opts = baseline_options(replace(opts, device=device), base)
    plan = make_plan(base_opts, loaded, docs, depth)
    tokens = run_tokens(skip.tokens, base["layout"]["chunk_tokens"], base["layout"]["n_tokens"])
    check_tokens(root, base, plan, tokens, opts.out)
    windows = int(np.searchsorted(plan.offsets, tokens, side="left"))
    layers = list(base["options"]["layers"])
    todo = []
    for run in runs:  # every check before the first run is written
        start = min(run.layers)
        stored = tuple(layer for layer in layers if layer >= start)
        if not stored:
            raise DepthcacheError(f"the baseline stores no layer at or after layer {start}: nothing to compare a "
                                  "skip there with")
        reuse = skip.prefix == "baseline" and start > 0 and start in layers
        attrs = run_attrs(base, run, stored, tokens, windows, skip, "baseline" if reuse else "recompute", device)
        todo.append((run, stored, reuse, attrs, existing_run(opts.out, run.name, attrs, opts.resume)))
    stops = future_stops(plan, skip.seed) if skip.variant == "future" else None
    done = {}
    finished = sum(1 for *_, previous in todo if previous is not None and previous["progress"]["complete"])
    chunk = int(base["layout"]["chunk_tokens"])
    rounded = f" (--skip-tokens {skip.tokens:,} rounded up to whole {chunk:,}-token chunks)" \
        if skip.tokens is not None and tokens != skip.tokens else ""
    with Progress("skip runs", len(todo), "runs", opts.progress, done=finished) as bar:
        for run, stored, reuse, attrs, previous in todo:
            if previous is not None and previous["progress"]["complete"]:
                done[run.name] = previous
                continue
            bar.note(f"run {run.name}, {tokens:,} baseline tokens{rounded}")
            ctx = RunContext(loaded, structure, plan, base_opts, run, stored, tokens, device,
                             root["resid_pre"] if reuse else None, layers.index(min(run.layers)) if reuse else 0,
                             stops)
            done[run.name] = execute_run(ctx, opts.out, run.name, attrs, previous)
            bar.update()
    return done
