"""Integrated gradients on the residual (analyses.md §4): which residual cells carry the answer?

For each layer l, the residual entering l at ALL positions is interpolated from a baseline (the mean of that
layer's residual over the prompt's positions, at every position) to its clean value, x(α) = b + α (h − b), and
f(x) = Σ_k p(answer token k) (teacher-forced) is differentiated w.r.t. x along the path. The mean gradient uses
the trapezoidal rule on ``steps`` intervals (steps + 1 evaluations, α = 0, 1/steps, …, 1), batched over α.
Attribution of cell (l, p) = Σ_d (h − b)[p, d] · mean gradient[p, d]. Completeness: Σ_p attribution[l, p] should
equal f(h) − f(b), the output change of replacing layer l's residual by the baseline at all positions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import xarray as xr

from depthcache.extract.architectures import architecture_for
from depthcache.locate.forward import clean_run, frozen, n_layers, run_from
from depthcache.locate.maps import Prompt, map_dataset

RULE = "trapezoid"


def trapezoid_weights(steps: int) -> np.ndarray:
    """(steps + 1,) weights of the trapezoidal rule on [0, 1] with ``steps`` intervals (they sum to 1)."""
    w = np.full(steps + 1, 1.0 / steps)
    w[[0, -1]] /= 2
    return w


def layer_ig(model: torch.nn.Module, prompt: Prompt, resid: torch.Tensor, layer: int, steps: int, batch_size: int
             ) -> tuple[np.ndarray, float, float]:
    """(per-position attribution, f(h), f(baseline)) of integrated gradients on one layer's residual (T, d)."""
    arch = architecture_for(model)
    h = resid.float()
    base = h[:prompt.n_prompt].double().mean(0).float().expand_as(h)
    alphas, weights = np.linspace(0.0, 1.0, steps + 1), trapezoid_weights(steps)
    grad_sum = torch.zeros(h.shape, dtype=torch.float64, device=h.device)
    ends: dict[float, float] = {}
    for start in range(0, steps + 1, batch_size):
        a = torch.tensor(alphas[start:start + batch_size], dtype=h.dtype, device=h.device).view(-1, 1, 1)
        x = (base + a * (h - base)).to(resid.dtype).requires_grad_(True)
        f = run_from(model, arch, layer, x, prompt).sum(-1)
        (grad,) = torch.autograd.grad(f.sum(), x)
        w = torch.tensor(weights[start:start + batch_size], dtype=torch.float64, device=h.device).view(-1, 1, 1)
        grad_sum += (grad.double() * w).sum(0)
        for alpha, value in zip(alphas[start:start + batch_size], f.detach().double().cpu().numpy()):
            if alpha in (0.0, 1.0):
                ends[alpha] = float(value)
    attribution = ((h - base).double() * grad_sum).sum(-1)
    return attribution.cpu().numpy(), ends[1.0], ends[0.0]


def igrad_map(model: torch.nn.Module, prompt: Prompt, steps: int = 256, batch_size: int = 32,
              on_layer: Callable[[], None] | None = None) -> xr.Dataset:
    """Layer × position integrated-gradients map of the answer probability, with per-layer completeness."""
    clean = clean_run(model, prompt)
    depth = n_layers(model)
    rows, f_input, f_base = [], [], []
    with frozen(model):
        for layer in range(depth):
            attribution, at_input, at_base = layer_ig(model, prompt, clean.resid[layer], layer, steps, batch_size)
            rows.append(attribution)
            f_input.append(at_input)
            f_base.append(at_base)
            if on_layer is not None:
                on_layer()
    attributions = np.stack(rows)
    ds = map_dataset(prompt, depth, {
        "attribution": (("layer", "position"), attributions),
        "attribution_sum": ("layer", attributions.sum(-1)),
        "output_difference": ("layer", np.array(f_input) - np.array(f_base)),
        "target_at_baseline": ("layer", np.array(f_base)),
        "answer_prob": ("answer_position", clean.answer_prob.cpu().numpy())})
    ds.attrs.update(steps=steps, rule=RULE, target="sum of answer-token probabilities (teacher-forced)",
                    baseline="mean over the prompt's positions of the layer's residual, at every position")
    return ds
