"""``depthcache hop-depth``: the paper's multi-hop depth score (docs/analyses.md, multihop), from the model itself.

Per task item the input is prompt + WHOLE answer (BOS first when the tokenizer adds one) and t is the position of the
answer's first token. Each layer s is skipped (it adds nothing to the residual) at positions 1..t−1 only, the
prompt's, as the paper's reference code does; the run is compared with the clean one at positions ≥ t, the answer's:
``layer_effect[s, l]`` = max over those positions of ‖d_l^skip − d_l‖ / max(‖d_l‖, 1e-6) (d_l: what layer l adds),
``output_l2[s]`` = max over them of ‖p_skip − p‖₂ (next-token distributions). The per-hop reductions and depth
scores are ``depthcache.analyze.multihop.paper_depth``. One forward per (item, skipped layer); each finished one is
saved in OUT.partial, so ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import torch
import xarray as xr

import depthcache
from depthcache.analyze.multihop import paper_depth
from depthcache.errors import DepthcacheError
from depthcache.locate.maps import MAP_ATTR, MAP_SCHEMA, Prompt, check_out, context_length, encode, write_map
from depthcache.locate.partial import Partial, partial_path
from depthcache.model import DEFAULT_MODEL, Capture, LoadedModel, Skip, load_model, n_layers, structure_of
from depthcache.progress import MINUTE, Progress
from depthcache.tasks import TaskItem, load_task

CLAMP = 1e-6


@dataclass(frozen=True)
class HopDepthOptions:
    """What ``hop-depth`` computes: task items (task, n; at most ``per_hops`` of each hop count) on one model."""

    out: str
    task: str
    model: str = DEFAULT_MODEL
    n: int | None = None
    per_hops: int | None = None  # the first this many items of each hop count (the paper: 20)
    device: str = "auto"
    progress: bool | None = None
    resume: bool = False


def whole_input(prompt: Prompt) -> tuple[list[int], int]:
    """(prompt + whole answer token ids, t = the first answer token's position): the teacher-forced input plus the
    answer's last token."""
    return [*prompt.input_ids, prompt.answer_ids[-1]], prompt.n_prompt


def contributions(model: torch.nn.Module, ids: torch.Tensor, skip: Skip | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer, T, d) float64 what each layer adds (attention + MLP) and (T, vocab) float64 next-token distributions
    of one forward of ``ids`` (1, T), under ``skip`` when given (its hooks run before the capture's)."""
    structure = structure_of(model)
    layers = range(structure.n_layers)
    with torch.inference_mode(), skip or nullcontext(), \
            Capture(model, structure, layers, ("attn", "mlp"), final=False) as cap:
        logits = model(input_ids=ids, use_cache=False).logits[0]
    added = torch.stack([cap.records["attn_out"][layer][0] + cap.records["mlp_out"][layer][0] for layer in layers])
    return added.double(), torch.softmax(logits.double(), dim=-1)


def skip_row(model: torch.nn.Module, ids: torch.Tensor, t: int, layer: int,
             clean: tuple[torch.Tensor, torch.Tensor]) -> dict[str, np.ndarray]:
    """Effects of skipping ``layer`` at positions 1..t−1, measured at positions ≥ t (see the module doc)."""
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    mask[:, 1:t] = True
    added, probs = contributions(model, ids, Skip(model, structure_of(model), (layer,), "layer", mask))
    base_added, base_probs = clean
    change = (added - base_added)[:, t:].norm(dim=-1) / base_added[:, t:].norm(dim=-1).clamp(min=CLAMP)
    out = (probs - base_probs)[t:].norm(dim=-1)
    return {"layer_effect": change.amax(-1).float().cpu().numpy(), "output_l2": np.float32(out.max().item())}


def selected(items: list[TaskItem], per_hops: int | None) -> list[TaskItem]:
    """The items in task order, at most ``per_hops`` of each hop count."""
    if per_hops is None:
        return items
    seen: dict[int, int] = {}
    kept = []
    for item in items:
        seen[item.hops] = seen.get(item.hops, 0) + 1
        if seen[item.hops] <= per_hops:
            kept.append(item)
    return kept


def encoded(items: list[TaskItem], loaded: LoadedModel) -> list[Prompt]:
    """Every item encoded (refused before any work when one is not a token continuation or is too long)."""
    limit = context_length(loaded.model.config)
    prompts = []
    for item in items:
        try:
            prompts.append(encode(loaded.tokenizer, item.prompt, item.answer, None if limit is None else limit - 1))
        except DepthcacheError as exc:
            raise DepthcacheError(f"task item {item.id!r}: {exc}") from exc
    return prompts


def item_effects(model: torch.nn.Module, prompt: Prompt, rows: Partial | None, item: int, bar: Progress
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(skipped layer, layer) layer effects and (skipped layer,) output effects of one item, each skipped layer's row
    saved in ``rows`` (an interrupted run's rows are reused)."""
    ids, t = whole_input(prompt)
    tensor = torch.tensor([ids], device=next(model.parameters()).device)
    clean = contributions(model, tensor)
    found = []
    for layer in range(n_layers(model)):
        def compute(layer: int = layer) -> dict[str, np.ndarray]:
            row = skip_row(model, tensor, t, layer, clean)
            bar.update()
            return row
        found.append(compute() if rows is None else rows.through(item)(layer, compute))
    return np.stack([r["layer_effect"] for r in found]), np.array([float(r["output_l2"]) for r in found])


def hop_depth_dataset(items: list[TaskItem], prompts: list[Prompt], effects: list[tuple[np.ndarray, np.ndarray]],
                      depth: int) -> xr.Dataset:
    """Per-item effects and, per hop count, the paper's reductions and depth scores."""
    hops = np.array([item.hops for item in items], dtype=np.int32)
    layer_effect = np.stack([e[0] for e in effects])
    output_l2 = np.stack([e[1] for e in effects])
    layers = np.arange(depth)
    return xr.Dataset(
        {"layer_effect": (("item", "skipped_layer", "layer"), layer_effect),
         "output_l2": (("item", "skipped_layer"), output_l2),
         "item_hops": ("item", hops),
         "prompt": ("item", np.array([p.prompt for p in prompts], dtype=object)),
         "answer": ("item", np.array([p.answer for p in prompts], dtype=object)),
         "first_answer_position": ("item", np.array([p.n_prompt for p in prompts], dtype=np.int32)),
         **paper_depth(layer_effect, output_l2, hops)},
        coords={"item": pd.Index(np.array([item.id for item in items], dtype=object), name="item"),
                "skipped_layer": layers, "layer": layers, "relative_depth": ("layer", layers / depth),
                "skipped_relative_depth": ("skipped_layer", layers / depth), "hops": np.unique(hops)})


def hop_depth(opts: HopDepthOptions, loaded: LoadedModel | None = None) -> xr.Dataset:
    """Compute the paper's multi-hop skip effects of every selected item, write them to ``opts.out`` (atomically)
    with the per-hop depth scores, and return the dataset."""
    check_out(opts.out)
    if opts.per_hops is not None and opts.per_hops < 1:
        raise DepthcacheError(f"--per-hops must be at least 1, got {opts.per_hops}")
    if partial_path(opts.out).exists() and not opts.resume:
        Partial(opts.out, {}, resume=False)  # refuses before the model is loaded
    items = selected(load_task(opts.task, n=opts.n), opts.per_hops)
    loaded = loaded or load_model(opts.model, device=opts.device, progress=opts.progress)
    prompts = encoded(items, loaded)
    depth = n_layers(loaded.model)
    model = loaded.provenance
    identity = {"kind": "hop-depth", "model": model.get("weights_sha256") or model["spec"],
                "code_version": depthcache.__version__, "device": str(next(loaded.model.parameters()).device),
                "prompts": hashlib.sha256(repr([whole_input(p) for p in prompts]).encode()).hexdigest()}
    partial = Partial(opts.out, identity, opts.resume)
    total = len(items) * depth
    with Progress("hop-depth", total, "skips", opts.progress, done=partial.count(),
                  every=0 if total <= 60 else MINUTE) as bar:
        effects = [item_effects(loaded.model, prompt, partial, i, bar) for i, prompt in enumerate(prompts)]
    ds = hop_depth_dataset(items, prompts, effects, depth)
    ds.attrs[MAP_ATTR] = {"kind": "hop-depth", "schema": MAP_SCHEMA, "model": loaded.provenance, "task": opts.task,
                          "n": opts.n, "per_hops": opts.per_hops, "code_version": depthcache.__version__,
                          "created": datetime.now(timezone.utc).isoformat()}
    write_map(ds, opts.out)
    partial.remove()
    return ds
