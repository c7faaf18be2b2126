"""``depthcache hop-depth``: the paper's multi-hop depth score (docs/analyses.md, multihop), from the model itself.

Per task item the input is prompt + WHOLE answer (BOS first when the tokenizer adds one) and t is the position of the
answer's first token. Each layer s is skipped (it adds nothing to the residual) at positions 1..t−1 only, the
prompt's, as the paper's reference code does; the run is compared with the clean one at positions ≥ t, the answer's:
``layer_effect[s, l]`` = max over those positions of ‖d_l^skip − d_l‖ / max(‖d_l‖, 1e-6) (d_l: what layer l adds),
``output_l2[s]`` = max over them of ‖p_skip − p‖₂ (next-token distributions). The per-hop reductions and depth
scores are ``depthcache.analyze.multihop.paper_depth``. ``batch_size`` skipped layers of one item per forward (one
batch row each) and one clean row, the baseline, in the same batch (float results depend on the batch's shape);
each finished (item, skipped layer) is saved in OUT.partial, so ``--resume`` continues after a kill.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
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
from depthcache.model import (
    DEFAULT_MODEL,
    Capture,
    LoadedModel,
    Placement,
    Skip,
    load_model,
    n_layers,
    structure_of,
)
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
    placement: Placement = Placement()  # --device-map, --max-memory, --offload-folder, --model-dtype
    batch_size: int = 32  # skipped layers per forward
    progress: bool | None = None
    resume: bool = False


def whole_input(prompt: Prompt) -> tuple[list[int], int]:
    """(prompt + whole answer token ids, t = the first answer token's position): the teacher-forced input plus the
    answer's last token."""
    return [*prompt.input_ids, prompt.answer_ids[-1]], prompt.n_prompt


def contributions(model: torch.nn.Module, ids: torch.Tensor, skipped: list[int], t: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """At positions ≥ t: (batch, layer, T − t, d) float64 what each layer adds (attention + MLP) and (batch, T − t,
    vocab) float64 next-token distributions, of one forward of ``ids`` (batch, T) in which row i < len(skipped)
    skips layer ``skipped[i]`` at positions 1..t−1 (the skip hooks run before the capture's)."""
    structure = structure_of(model)
    layers = range(structure.n_layers)
    with torch.inference_mode(), ExitStack() as stack:
        for row, layer in enumerate(skipped):
            mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
            mask[row, 1:t] = True
            stack.enter_context(Skip(model, structure, (layer,), "layer", mask))
        cap = stack.enter_context(Capture(model, structure, layers, ("attn", "mlp"), final=False))
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - t).logits
    added = torch.stack([(cap.records["attn_out"][layer] + cap.records["mlp_out"][layer])[:, t:] for layer in layers],
                        dim=1)
    return added.double(), torch.softmax(logits.double(), dim=-1)


def skip_rows(model: torch.nn.Module, ids: list[int], t: int, skipped: list[int]) -> list[dict[str, np.ndarray]]:
    """Effects of skipping each layer of ``skipped`` (one batch row each) at positions 1..t−1, measured at positions
    ≥ t against a last, clean row of the same batch (float results depend on the batch's shape; see the module
    doc)."""
    batch = torch.tensor([ids] * (len(skipped) + 1), device=next(model.parameters()).device)
    added, probs = contributions(model, batch, skipped, t)
    change = (added[:-1] - added[-1]).norm(dim=-1) / added[-1].norm(dim=-1).clamp(min=CLAMP)
    out = (probs[:-1] - probs[-1]).norm(dim=-1).amax(-1)
    return [{"layer_effect": change[i].amax(-1).float().cpu().numpy(), "output_l2": np.float32(out[i].item())}
            for i in range(len(skipped))]


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


def item_effects(model: torch.nn.Module, prompt: Prompt, partial: Partial, item: int, batch_size: int,
                 bar: Progress) -> tuple[np.ndarray, np.ndarray]:
    """(skipped layer, layer) layer effects and (skipped layer,) output effects of one item: the skipped layers not
    saved in ``partial`` yet, ``batch_size`` per forward, each saved there as it finishes."""
    ids, t = whole_input(prompt)
    depth = n_layers(model)
    missing = [layer for layer in range(depth) if partial.get(item, layer) is None]
    for start in range(0, len(missing), batch_size):
        skipped = missing[start:start + batch_size]
        for layer, row in zip(skipped, skip_rows(model, ids, t, skipped)):
            partial.put(item, layer, row)
            bar.update()
    found = [partial.get(item, layer) for layer in range(depth)]
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
    for name, value in (("--per-hops", opts.per_hops), ("--batch-size", opts.batch_size)):
        if value is not None and value < 1:
            raise DepthcacheError(f"{name} must be at least 1, got {value}")
    if partial_path(opts.out).exists() and not opts.resume:
        Partial(opts.out, {}, resume=False)  # refuses before the model is loaded
    items = selected(load_task(opts.task, n=opts.n), opts.per_hops)
    loaded = loaded or load_model(opts.model, device=opts.device, progress=opts.progress, placement=opts.placement)
    prompts = encoded(items, loaded)
    depth = n_layers(loaded.model)
    model = loaded.provenance
    identity = {"kind": "hop-depth", "model": model.get("weights_sha256") or model["spec"],
                "code_version": depthcache.__version__, "device": str(next(loaded.model.parameters()).device),
                "batch_size": opts.batch_size,
                "prompts": hashlib.sha256(repr([whole_input(p) for p in prompts]).encode()).hexdigest()}
    partial = Partial(opts.out, identity, opts.resume)
    total = len(items) * depth
    with Progress("hop-depth", total, "skips", opts.progress, done=partial.count(),
                  every=0 if total <= 60 else MINUTE) as bar:
        effects = [item_effects(loaded.model, prompt, partial, i, opts.batch_size, bar)
                   for i, prompt in enumerate(prompts)]
    ds = hop_depth_dataset(items, prompts, effects, depth)
    ds.attrs[MAP_ATTR] = {"kind": "hop-depth", "schema": MAP_SCHEMA, "model": loaded.provenance, "task": opts.task,
                          "n": opts.n, "per_hops": opts.per_hops, "code_version": depthcache.__version__,
                          "created": datetime.now(timezone.utc).isoformat()}
    write_map(ds, opts.out)
    partial.remove()
    return ds
