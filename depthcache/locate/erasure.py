"""Residual erasure (docs/analyses.md, where information lives): how much does the answer depend on one (layer, position) cell of the residual?

Each cell's residual is replaced by its layer's mean residual; the run restarts at that layer from the clean run's
cached residual (batched: one copy of the sequence per erased position); layer L is the final residual (the final
norm's input). A cell's value is, by ``measure`` (teacher-forced, at the positions predicting answer tokens):
``answer-prob`` (default) the max over answer tokens of |Δ p(answer token)|; ``distribution-l2`` (the paper's) the
max over those positions of ‖p_erased − p_clean‖₂, the L2 distance of the whole next-token distributions.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from depthcache.locate.maps import Prompt, Rows, computed, map_dataset
from depthcache.model import Clean, answer_probs, clean_run, logits_from, n_layers, output_probs, structure_of

VARIABLES = {"answer-prob": "max_prob_change", "distribution-l2": "max_distribution_l2"}  # measure -> map variable
MEASURES = tuple(VARIABLES)


def erased_copies(resid: torch.Tensor, positions: list[int], mean: torch.Tensor) -> torch.Tensor:
    """(len(positions), T, d) copies of one layer's residual (T, d), copy i with ``positions[i]`` set to ``mean``."""
    copies = resid.unsqueeze(0).repeat(len(positions), 1, 1)
    copies[torch.arange(len(positions)), positions] = mean.to(copies.dtype)
    return copies


def output_change(logits: torch.Tensor, prompt: Prompt, clean: Clean, measure: str) -> torch.Tensor:
    """(batch,) change of the output against the clean run, by ``measure`` (see the module doc)."""
    if measure == "answer-prob":
        return (answer_probs(logits, prompt) - clean.answer_prob).abs().amax(-1)
    return (output_probs(logits, prompt) - clean.probs).double().norm(dim=-1).amax(-1)


def erase_layer(model: torch.nn.Module, prompt: Prompt, clean: Clean, layer: int, mean: torch.Tensor,
                batch_size: int, measure: str = "answer-prob") -> np.ndarray:
    """(positions,) output change (``measure``) of erasing each position at ``layer``, ``batch_size`` per forward."""
    structure = structure_of(model)
    n = len(prompt.input_ids)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        positions = list(range(start, min(start + batch_size, n)))
        with torch.inference_mode():
            logits = logits_from(model, structure, layer, erased_copies(clean.resid[layer], positions, mean), prompt)
        out[start:start + len(positions)] = output_change(logits, prompt, clean, measure).cpu().numpy()
    return out


def erasure_map(model: torch.nn.Module, prompt: Prompt, mean: torch.Tensor, layers: list[int] | None = None,
                batch_size: int = 64, rows: Rows = computed, measure: str = "answer-prob") -> xr.Dataset:
    """Layer × position map of the answer's sensitivity to erasing each residual cell (``mean``: (layer, d), with row
    L when ``layers`` holds L, the final residual; ``layers``: 0..L−1 by default; ``rows`` as in ``igrad_map``)."""
    clean = clean_run(model, prompt)
    depth = n_layers(model)
    layers = list(range(depth)) if layers is None else layers
    name = VARIABLES[measure]
    change = np.stack([rows(layer, lambda layer=layer: {name: erase_layer(
        model, prompt, clean, layer, mean[layer], batch_size, measure)})[name] for layer in layers])
    return map_dataset(prompt, depth, layers, {name: (("layer", "position"), change),
                                               "answer_prob": ("answer_position", clean.answer_prob.cpu().numpy())})
