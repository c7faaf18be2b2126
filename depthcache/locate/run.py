"""``depthcache erase`` / ``igrad``: load the model, encode every prompt (refusing bad ones before any work),
compute one map per prompt, and write them as one location-map store."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import xarray as xr

import depthcache
from depthcache.errors import DepthcacheError
from depthcache.layerspec import parse_layers
from depthcache.locate.erasure import MEASURES, erasure_map
from depthcache.locate.igrad import BASELINES, RULES, SITES, igrad_map
from depthcache.locate.maps import (
    KINDS,
    MAP_ATTR,
    MAP_SCHEMA,
    Prompt,
    Rows,
    check_out,
    context_length,
    encode,
    stack_items,
    write_map,
)
from depthcache.locate.partial import Partial, partial_path
from depthcache.locate.reference import Reference, sequence_mean, store_mean
from depthcache.model import DEFAULT_MODEL, LoadedModel, Placement, Structure, load_model, n_layers, structure_of
from depthcache.progress import MINUTE, Progress
from depthcache.store.layout import part_modules
from depthcache.tasks import load_task


@dataclass(frozen=True)
class LocateOptions:
    """What ``erase``/``igrad`` compute: one prompt (prompt + answer) or task items (task, n)."""

    out: str
    model: str = DEFAULT_MODEL
    prompt: str | None = None
    answer: str | None = None
    task: str | None = None
    n: int | None = None
    device: str = "auto"
    placement: Placement = Placement()  # --device-map, --max-memory, --offload-folder, --model-dtype
    reference: str | None = None  # erasure: activation store giving the mean residual
    reference_windows: int = 8  # erasure without a reference store: pydoc-topics windows
    layers: str = "all"  # which layers get a row of the map
    steps: int | None = None  # igrad: equal intervals (the adaptive rule's start)
    tolerance: float = 0.01  # igrad: completeness target, relative to |f(h) - f(baseline)|
    max_steps: int = 4096  # igrad: most intervals adaptive refinement may reach per layer
    batch_size: int = 64
    progress: bool | None = None  # None: a bar on a terminal, a line per layer elsewhere
    resume: bool = False  # continue from OUT.partial
    # Measures: None takes ours (OURS), or the paper's (PAPER) with paper=True.
    paper: bool = False
    final_residual: bool | None = None  # also map the final residual, as row L
    measure: str | None = None  # erasure: answer-prob | distribution-l2
    include_first: bool | None = None  # erasure: position 0 in the mean residual
    rule: str | None = None  # igrad: adaptive-trapezoid | left-riemann
    baseline_positions: str | None = None  # igrad: prompt | sequence
    site: str = "resid"  # igrad: resid | attn | mlp


# Every choice where the paper's measure differs from depthcache's default, per kind (docs/analyses.md).
OURS = {"erasure": {"measure": "answer-prob", "include_first": False, "final_residual": False},
        "igrad": {"rule": "adaptive-trapezoid", "steps": 64, "baseline_positions": "prompt", "final_residual": False}}
PAPER = {"erasure": {"measure": "distribution-l2", "include_first": True, "final_residual": True},
         "igrad": {"rule": "left-riemann", "steps": 256, "baseline_positions": "sequence", "final_residual": True}}
ALLOWED = {"measure": MEASURES, "rule": tuple(RULES), "baseline_positions": tuple(BASELINES)}
MODULE_SITE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # igrad --site: resid, attn, mlp or one branch module
ONLY = {"measure": "erasure", "include_first": "erasure", "rule": "igrad", "baseline_positions": "igrad"}


def resolved(kind: str, opts: LocateOptions) -> LocateOptions:
    """``opts`` with every unset choice filled in: the paper's with ``paper``, else ours (the attention and MLP sites
    have no final row, so there it stays off)."""
    choices = dict((PAPER if opts.paper else OURS)[kind])
    if opts.site != "resid":
        choices["final_residual"] = False
    return replace(opts, **{k: v for k, v in choices.items() if getattr(opts, k) is None})


def plan(kind: str, opts: LocateOptions) -> str:
    """One line naming the choices the map will be computed with, each the paper's one marked '(paper)'."""
    o = resolved(kind, opts)
    said = {"measure": f"measure {o.measure}", "include_first": "mean residual over "
            + ("all positions" if o.include_first else "positions >= 1"), "rule": f"rule {o.rule}",
            "steps": f"{o.steps} steps", "baseline_positions": f"baseline: mean over the {o.baseline_positions}",
            "final_residual": f"final residual as row L: {'yes' if o.final_residual else 'no'}"}
    parts = [f"{said[key]}{' (paper)' if getattr(o, key) == value else ''}" for key, value in PAPER[kind].items()]
    return f"{'erase' if kind == 'erasure' else 'igrad'}: " + ", ".join(([f"site {o.site}"] if kind == "igrad" else [])
                                                                      + parts)


def check_options(kind: str, opts: LocateOptions) -> None:
    """Refuse inconsistent options before the model is loaded."""
    if kind not in KINDS:
        raise DepthcacheError(f"unknown location map kind {kind!r}; choose from {', '.join(KINDS)}")
    for key, allowed in ALLOWED.items():
        if getattr(opts, key) is not None and getattr(opts, key) not in allowed:
            raise DepthcacheError(f"--{key.replace('_', '-')} {getattr(opts, key)!r} is not one of "
                                  f"{', '.join(allowed)}")
    for key, only in ONLY.items():
        if getattr(opts, key) is not None and kind != only:
            raise DepthcacheError(f"--{key.replace('_', '-')} applies to {'erase' if only == 'erasure' else only} only")
    if opts.site not in SITES and not MODULE_SITE.fullmatch(opts.site):
        raise DepthcacheError(f"--site {opts.site!r} is not one of {', '.join(SITES)} or a branch module's name")
    if kind == "erasure" and opts.site != "resid":
        raise DepthcacheError("--site applies to igrad only: erasure replaces residual cells")
    if opts.site != "resid" and opts.final_residual:
        raise DepthcacheError(f"--final-residual needs --site resid: the {opts.site} outputs have no row after the "
                              "last layer")
    opts = resolved(kind, opts)
    single = opts.prompt is not None or opts.answer is not None
    if single == (opts.task is not None):
        raise DepthcacheError("give either --prompt with --answer, or --task (a built-in task or a .jsonl file)")
    if single and (opts.prompt is None or opts.answer is None):
        raise DepthcacheError("--prompt needs --answer (the continuation whose probability is tracked), and vice versa")
    for name, value in (("--steps", opts.steps), ("--batch-size", opts.batch_size),
                        ("--reference-windows", opts.reference_windows)):
        if value is not None and value < 1:
            raise DepthcacheError(f"{name} must be at least 1, got {value}")
    if opts.tolerance < 0:
        raise DepthcacheError(f"--tolerance must be at least 0, got {opts.tolerance}")
    if opts.rule == "adaptive-trapezoid" and opts.max_steps < opts.steps:
        raise DepthcacheError(f"--max-steps ({opts.max_steps}) must be at least --steps ({opts.steps}); "
                              "equal values turn adaptive refinement off")
    if kind == "igrad" and opts.reference is not None:
        raise DepthcacheError("--reference applies to erase only: igrad's baseline is the prompt's own mean residual")
    check_out(opts.out)


def prompts(opts: LocateOptions, loaded: LoadedModel) -> tuple[list[str], list[Prompt]]:
    """(item ids, encoded prompts); every item is checked before any map is computed."""
    limit = context_length(loaded.model.config)
    if opts.task is None:
        return ["prompt"], [encode(loaded.tokenizer, opts.prompt, opts.answer, limit)]
    items = load_task(opts.task, n=opts.n)
    encoded = []
    for item in items:
        try:
            encoded.append(encode(loaded.tokenizer, item.prompt, item.answer, limit))
        except DepthcacheError as exc:
            raise DepthcacheError(f"task item {item.id!r}: {exc}") from exc
    return [item.id for item in items], encoded


def reference(opts: LocateOptions, loaded: LoadedModel) -> Reference:
    """The mean residual per layer erasure writes: from --reference, else from pydoc-topics windows."""
    if opts.reference is not None:
        return store_mean(opts.reference, loaded, opts.include_first, opts.final_residual)
    return sequence_mean(loaded, opts.reference_windows, opts.include_first, opts.final_residual)


def measure_attrs(kind: str, opts: LocateOptions) -> dict[str, Any]:
    """The choices a map's numbers depend on (``opts`` resolved): stored in the map and compared on --resume."""
    if kind == "erasure":
        return {"measure": opts.measure, "include_first": opts.include_first, "final_residual": opts.final_residual}
    adaptive = opts.rule == "adaptive-trapezoid"
    return {"steps": opts.steps, "rule": opts.rule, "baseline_positions": opts.baseline_positions, "site": opts.site,
            "final_residual": opts.final_residual,
            **({"tolerance": opts.tolerance, "max_steps": opts.max_steps} if adaptive else {})}


def map_attrs(kind: str, opts: LocateOptions, loaded: LoadedModel, ref: Reference | None) -> dict:
    """The ``depthcache_map`` attribute: what the store is and how it was made."""
    return {"kind": kind, "schema": MAP_SCHEMA, "model": loaded.provenance, "reference": None if ref is None else
            ref.source, "task": opts.task, "layers": opts.layers, "paper": opts.paper, **measure_attrs(kind, opts),
            "code_version": depthcache.__version__, "created": datetime.now(timezone.utc).isoformat()}


def job_identity(kind: str, opts: LocateOptions, loaded: LoadedModel, encoded: list[Prompt], layers: tuple[int, ...],
                 ref: Reference | None) -> dict[str, Any]:
    """Everything a map's numbers depend on: an interrupted run resumes only with all of it unchanged."""
    model = loaded.provenance
    return {"kind": kind, "model": model.get("weights_sha256") or model["spec"], "code_version": depthcache.__version__,
            "prompts": [[p.input_ids, p.answer_ids] for p in encoded], "layers": list(layers),
            "device": str(next(loaded.model.parameters()).device), "batch_size": opts.batch_size,
            **measure_attrs(kind, opts),
            **({} if ref is None else
               {"reference": hashlib.sha256(np.ascontiguousarray(ref.mean).tobytes()).hexdigest()})}


def check_site(structure: Structure, site: str, layers: tuple[int, ...]) -> None:
    """Refuse an igrad site that some chosen layer does not have (a Mamba layer has no MLP to interpolate), or a
    branch module the model does not keep apart (a module site needs a role some layer has several modules of)."""
    if site not in SITES and site not in part_modules(structure.attn, structure.mlp):
        raise DepthcacheError(f"--site {site}: {structure.class_name} has no branch module {site!r} beside others "
                              f"of its kind; sites: {', '.join((*SITES, *part_modules(structure.attn, structure.mlp)))}")
    lacking = [layer for layer in layers if site != "resid" and not has_site(structure, site, layer)]
    if lacking:
        raise DepthcacheError(f"--site {site}: layer {lacking[0]} of {structure.class_name} has no {site} branch "
                              f"({len(lacking)} of the chosen layers lack one); choose --layers that have it or "
                              "--site resid")


def has_site(structure: Structure, site: str, layer: int) -> bool:
    """Layer ``layer`` has the igrad site: a branch role with a module, or that branch module."""
    if site in ("attn", "mlp"):
        return bool(structure.paths(site, layer))
    return any(site in structure.paths(role, layer) for role in ("attn", "mlp"))


def locate(kind: str, opts: LocateOptions, loaded: LoadedModel | None = None) -> xr.Dataset:
    """Compute the ``kind`` map of every prompt and write them to ``opts.out`` (atomically); each finished layer is
    saved in OUT.partial first, so ``opts.resume`` continues an interrupted run. Returns the dataset."""
    check_options(kind, opts)
    opts = resolved(kind, opts)
    if partial_path(opts.out).exists() and not opts.resume:
        Partial(opts.out, {}, resume=False)  # refuses before the model is loaded
    loaded = loaded or load_model(opts.model, device=opts.device, progress=opts.progress, placement=opts.placement)
    ids, encoded = prompts(opts, loaded)
    depth = n_layers(loaded.model)
    layers = parse_layers(opts.layers, depth) + ((depth,) if opts.final_residual else ())
    check_site(structure_of(loaded.model), opts.site, layers)
    ref = reference(opts, loaded) if kind == "erasure" else None
    partial = Partial(opts.out, job_identity(kind, opts, loaded, encoded, layers, ref), opts.resume)
    maps = []
    total = len(encoded) * len(layers)
    with Progress(kind, total, "layers", opts.progress, done=partial.count(), every=0 if total <= 60 else MINUTE
                  ) as bar:
        for item, prompt in enumerate(encoded):
            rows = counted(partial.through(item), bar, f"item {ids[item]}, " if opts.task else "")
            if ref is not None:
                mean = torch.from_numpy(ref.mean).to(next(loaded.model.parameters()).device)
                maps.append(erasure_map(loaded.model, prompt, mean, list(layers), opts.batch_size, rows, opts.measure))
            else:
                maps.append(igrad_map(loaded.model, prompt, list(layers), opts.steps, opts.batch_size, opts.tolerance,
                                      opts.max_steps, rows, refinement_note(bar, opts.tolerance, ids[item]
                                                                            if opts.task else None),
                                      opts.rule, opts.baseline_positions, opts.site))
    ds = maps[0] if opts.task is None else stack_items(maps, ids)
    ds.attrs[MAP_ATTR] = map_attrs(kind, opts, loaded, ref)
    write_map(ds, opts.out)
    partial.remove()
    return ds


def counted(rows: Rows, bar: Progress, where: str) -> Rows:
    """``rows`` that advance the bar by one for each layer computed in this run (saved ones are counted already)."""
    def row(layer: int, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        def computing() -> dict[str, np.ndarray]:
            bar.note(f"{where}layer {layer}")
            found = compute()
            bar.update()
            return found
        return rows(layer, computing)
    return row


def refinement_note(bar: Progress, tolerance: float, item: str | None) -> Callable[[int, int, float], None]:
    """Shows igrad's refinement inside a layer: intervals so far and the completeness error against its target."""
    where = f"item {item}, " if item is not None else ""
    return lambda layer, n, error: bar.note(f"{where}layer {layer}: {n:,} intervals, completeness error "
                                            f"{error:.2g} (target {tolerance:g})")
