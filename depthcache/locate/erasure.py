"""Residual erasure (docs/analyses.md, where information lives): how much does the answer depend on one (layer, position) cell of the residual?

Each cell's residual is replaced by its layer's mean residual; the run restarts at that layer from the clean run's
cached residual (batched: one copy of the sequence per erased position), and the cell's value is the max over answer
tokens of |Δ p(answer token)| (teacher-forced).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from depthcache.locate.maps import Prompt, Rows, computed, map_dataset
from depthcache.model import Clean, clean_run, n_layers, run_from, structure_of


def erased_copies(resid: torch.Tensor, positions: list[int], mean: torch.Tensor) -> torch.Tensor:
    """(len(positions), T, d) copies of one layer's residual (T, d), copy i with ``positions[i]`` set to ``mean``."""
    copies = resid.unsqueeze(0).repeat(len(positions), 1, 1)
    copies[torch.arange(len(positions)), positions] = mean.to(copies.dtype)
    return copies


def erase_layer(model: torch.nn.Module, prompt: Prompt, clean: Clean, layer: int, mean: torch.Tensor,
                batch_size: int) -> np.ndarray:
    """(positions,) max |Δ p(answer)| of erasing each position at ``layer``, ``batch_size`` positions per forward."""
    structure = structure_of(model)
    n = len(prompt.input_ids)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        positions = list(range(start, min(start + batch_size, n)))
        with torch.inference_mode():
            probs = run_from(model, structure, layer, erased_copies(clean.resid[layer], positions, mean), prompt)
        out[start:start + len(positions)] = (probs - clean.answer_prob).abs().amax(-1).cpu().numpy()
    return out


def erasure_map(model: torch.nn.Module, prompt: Prompt, mean: torch.Tensor, layers: list[int] | None = None,
                batch_size: int = 64, rows: Rows = computed) -> xr.Dataset:
    """Layer × position map of the answer's sensitivity to erasing each residual cell (``mean``: (layer, d);
    ``layers``: all by default; ``rows`` as in ``igrad_map``)."""
    clean = clean_run(model, prompt)
    depth = n_layers(model)
    layers = list(range(depth)) if layers is None else layers
    change = np.stack([rows(layer, lambda layer=layer: {"max_prob_change": erase_layer(
        model, prompt, clean, layer, mean[layer], batch_size)})["max_prob_change"] for layer in layers])
    return map_dataset(prompt, depth, layers, {"max_prob_change": (("layer", "position"), change),
                                               "answer_prob": ("answer_position", clean.answer_prob.cpu().numpy())})
