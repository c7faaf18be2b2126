"""Integrated gradients on the residual (docs/analyses.md): which residual cells carry the answer?

For each layer l, the residual entering l at ALL positions is interpolated from a baseline (the mean of that
layer's residual over the prompt's positions, at every position) to its clean value, x(α) = b + α (h − b), and
f(x) = Σ_k p(answer token k) (teacher-forced) is differentiated w.r.t. x along the path. Attribution of cell
(l, p) = ∫₀¹ Σ_d (h − b)[p, d] ∂f/∂x[p, d](x(α)) dα. Completeness: Σ_p attribution[l, p] = f(h) − f(b).
Layer L is the final residual (the final norm's input). Options beside these defaults, the paper's choices:
``baseline="sequence"`` averages over every position of prompt + whole answer (the teacher-forced input plus the
last answer token) instead of the prompt's; ``site="attn"``/``"mlp"`` interpolates what that branch of layer l adds
(the residual entering l kept clean, every later computation rerun) instead of the residual; ``rule="left-riemann"``
is the paper's sum (1/n) Σ_{k<n} q(k/n) over ``steps`` equal intervals, without refinement.

The default integral uses the trapezoidal rule, starting from ``steps`` equal intervals and then refined adaptively: on
the real model the integrand can be a narrow spike (the attention-sink position moving from the mean residual to
its outlier value switches attention patterns abruptly), which equal steps miss. Completeness splits over
intervals: on [a, b] the trapezoid of the directional derivative should equal f(b) − f(a), so each interval's
error is known exactly from values already computed. Intervals whose |error| exceeds their share are bisected,
the worst ``ROUND`` first, until the completeness error (the signed errors' sum) is at most ``tolerance`` ×
max(|f(h) − f(b)|, ``SCALE_FLOOR``) or ``max_steps`` is reached. The cap keeps each round's new points where the
error is: on SmolLM2's early layers the integrand is rough along the whole path, the share of the budget per
interval falls as intervals multiply, and uncapped rounds bisected hundreds of intervals of small error at once
(2,070 intervals for layer 0 of the README's arithmetic prompt against 915 capped, to the same tolerance). The sum of
|errors| is not the stopping rule: f carries float32 noise of ≈ 1e-6 per evaluation on the real model, which that
sum accumulates over fine grids while the signed sum telescopes it away.

The points of a round are evaluated ``batch_size`` at a time, each batch one forward and one backward pass of the
layers from l on (they share the prompt; layers below l are never rerun).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from depthcache.locate.maps import Prompt, Rows, computed, map_dataset
from depthcache.model import Clean, Replace, clean_run, frozen, n_layers, run_from, structure_of, whole_sequence

RULES = {"adaptive-trapezoid": "trapezoid, adaptive bisection (at most 128 intervals per round)",
         "left-riemann": "left Riemann sum over equal steps, no refinement (the paper's)"}
BASELINES = {"prompt": "mean over the prompt's positions of the layer's {site}, at every position",
             "sequence": "mean over every position of prompt + whole answer of the layer's {site}, at every position "
                         "(the paper's)"}
SITES = {"resid": "residual", "attn": "attention output", "mlp": "MLP output"}
ROUND = 128  # most intervals bisected per round: the worst ones first, then errors are measured again
SCALE_FLOOR = 0.01  # output differences below 1% probability are judged on this absolute scale (float32 noise)

# evaluate(alphas) -> (f at each alpha (n,), directional derivative per position (n, T))
PathFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class PathIntegral:
    """Per-position integral of the directional derivative along α ∈ [0, 1], and the end values of f."""

    attribution: np.ndarray  # (T,) float64
    f_end: float  # f(α = 1)
    f_start: float  # f(α = 0)
    intervals: int  # trapezoid intervals used
    error_bound: float  # Σ over intervals of |trapezoid − (f(b) − f(a))| ≥ |Σ attribution − (f_end − f_start)|


def interval_pieces(alphas: np.ndarray, f: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-interval trapezoid of q (n − 1, T), per-interval signed completeness error (n − 1,))."""
    pieces = np.diff(alphas)[:, None] / 2 * (q[:-1] + q[1:])
    return pieces, pieces.sum(1) - np.diff(f)


def relative_error(errors: np.ndarray, f: np.ndarray) -> float:
    """|Σ interval errors| / max(|f(1) − f(0)|, SCALE_FLOOR): the completeness error ``tolerance`` bounds."""
    return float(abs(errors.sum()) / max(abs(f[-1] - f[0]), SCALE_FLOOR))


def integrate_path(evaluate: PathFunction, steps: int, tolerance: float, max_steps: int,
                   on_round: Callable[[int, float], None] | None = None) -> PathIntegral:
    """Adaptive trapezoidal integral of ``evaluate``'s derivative from ``steps`` equal intervals (see module doc);
    ``on_round(intervals, relative completeness error)`` is told where each round of refinement stands."""
    alphas = np.linspace(0.0, 1.0, steps + 1)
    f, q = evaluate(alphas)
    while True:
        pieces, errors = interval_pieces(alphas, f, q)
        if on_round is not None:
            on_round(len(errors), relative_error(errors, f))
        budget = tolerance * max(abs(f[-1] - f[0]), SCALE_FLOOR)
        room = max_steps - len(errors)
        if abs(errors.sum()) <= budget or room <= 0:
            break
        size = np.abs(errors)
        over = int((size > budget / len(errors)).sum())
        chosen = np.argsort(size)[::-1][:min(room, max(over, 1), ROUND)]
        mids = (alphas[chosen] + alphas[chosen + 1]) / 2
        f_mid, q_mid = evaluate(mids)
        order = np.argsort(np.concatenate([alphas, mids]), kind="stable")
        alphas = np.concatenate([alphas, mids])[order]
        f, q = np.concatenate([f, f_mid])[order], np.concatenate([q, q_mid])[order]
    return PathIntegral(pieces.sum(0), float(f[-1]), float(f[0]), len(errors), float(np.abs(errors).sum()))


def left_riemann(evaluate: PathFunction, steps: int) -> PathIntegral:
    """The paper's rule: Σ_{k<steps} q(k/steps) / steps, the derivative taken at each interval's left end (α = 1 is
    evaluated for f(h) only); the error bound is Σ over intervals of |left rectangle − (f(b) − f(a))|."""
    alphas = np.linspace(0.0, 1.0, steps + 1)
    f, q = evaluate(alphas)
    pieces = np.diff(alphas)[:, None] * q[:-1]
    errors = pieces.sum(1) - np.diff(f)
    return PathIntegral(pieces.sum(0), float(f[-1]), float(f[0]), steps, float(np.abs(errors).sum()))


def completeness_error(ds: xr.Dataset) -> float:
    """Largest |Σ attribution − (f(h) − f(b))| / max(|f(h) − f(b)|, SCALE_FLOOR) over the layers (and items) of a
    map: the quantity ``tolerance`` bounds unless ``max_steps`` was reached."""
    scale = abs(ds.output_difference).clip(min=SCALE_FLOOR)
    return float((abs(ds.attribution_sum - ds.output_difference) / scale).max())


def site_value(resid: torch.Tensor, added: dict[str, torch.Tensor], layer: int, site: str) -> torch.Tensor:
    """(positions, d) what is attributed at ``layer``: the residual entering it (row L: the final residual), or
    what its attention or MLP branch (or one branch module) adds (``resid``, ``added`` as a clean run captures them)."""
    return resid[layer] if site == "resid" else added[site][layer]


def baseline_of(values: torch.Tensor, prompt: Prompt, baseline: str) -> torch.Tensor:
    """(d,) float32 mean of ``values`` (positions, d: the whole sequence's for ``sequence``, the teacher-forced
    input's for ``prompt``) over the positions ``baseline`` names, accumulated in float64."""
    rows = values[:prompt.n_prompt] if baseline == "prompt" else values
    return rows.double().mean(0).float()


def site_path(model: torch.nn.Module, prompt: Prompt, clean: Clean, layer: int, site: str, base: torch.Tensor,
              batch_size: int) -> PathFunction:
    """f and its per-position directional derivative on the straight path from ``base`` (d,), at every position, to
    ``site``'s clean value at ``layer``: the values of α are evaluated ``batch_size`` at a time, each batch one forward
    and one backward pass from layer ``layer`` (the prompt is shared; the layers before it are never rerun)."""
    structure = structure_of(model)
    value = site_value(clean.resid, clean.added, layer, site)
    h = value.float()
    base = base.to(h.device).expand_as(h)
    direction = h - base
    along = direction.double()

    def evaluate(alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, slopes = [], []
        for start in range(0, len(alphas), batch_size):
            a = torch.tensor(alphas[start:start + batch_size], dtype=h.dtype, device=h.device).view(-1, 1, 1)
            x = (base + a * direction).to(value.dtype).requires_grad_(True)
            if site == "resid":
                f = run_from(model, structure, layer, x, prompt).sum(-1)
            else:
                with Replace(model, structure, layer, site, x):
                    entering = clean.resid[layer].expand(len(a), -1, -1)
                    f = run_from(model, structure, layer, entering, prompt).sum(-1)
            (grad,) = torch.autograd.grad(f.sum(), x)
            values.append(f.detach().double().cpu().numpy())
            slopes.append((grad.double() * along).sum(-1).cpu().numpy())
        return np.concatenate(values), np.concatenate(slopes)

    return evaluate


def layer_attribution(evaluate: PathFunction, steps: int, tolerance: float, max_steps: int, rule: str,
                      on_round: Callable[[int, float], None] | None = None) -> dict[str, np.ndarray]:
    """One layer's row of the map: attribution per position, f at both ends, intervals used, error bound."""
    r = integrate_path(evaluate, steps, tolerance, max_steps, on_round) if rule == "adaptive-trapezoid" else \
        left_riemann(evaluate, steps)
    return {"attribution": r.attribution, "f_end": np.float64(r.f_end), "f_start": np.float64(r.f_start),
            "intervals": np.int32(r.intervals), "error_bound": np.float64(r.error_bound)}


def igrad_map(model: torch.nn.Module, prompt: Prompt, layers: list[int] | None = None, steps: int = 64,
              batch_size: int = 64, tolerance: float = 0.01, max_steps: int = 4096, rows: Rows = computed,
              on_round: Callable[[int, int, float], None] | None = None, rule: str = "adaptive-trapezoid",
              baseline: str = "prompt", site: str = "resid") -> xr.Dataset:
    """Layer × position integrated-gradients map of the answer probability (``layers``: 0..L−1 by default, L: the
    final residual), with per-layer completeness; ``on_round(layer, intervals, relative error)`` follows the
    refinement; ``rule``, ``baseline`` and ``site`` as in the module doc."""
    clean = clean_run(model, prompt)
    depth = n_layers(model)
    layers = list(range(depth)) if layers is None else layers
    source = whole_sequence(model, prompt) if baseline == "sequence" else (clean.resid, clean.added)
    done = []
    with frozen(model):
        for layer in layers:
            note = None if on_round is None else (lambda n, e, layer=layer: on_round(layer, n, e))
            base = baseline_of(site_value(*source, layer, site), prompt, baseline)
            path = site_path(model, prompt, clean, layer, site, base, batch_size)
            done.append(rows(layer, lambda path=path, note=note: layer_attribution(
                path, steps, tolerance, max_steps, rule, note)))
    attributions = np.stack([r["attribution"] for r in done])
    f_end, f_start = (np.array([float(r[k]) for r in done]) for k in ("f_end", "f_start"))
    ds = map_dataset(prompt, depth, layers, {
        "attribution": (("layer", "position"), attributions),
        "attribution_sum": ("layer", attributions.sum(-1)),
        "output_difference": ("layer", f_end - f_start),
        "target_at_baseline": ("layer", f_start),
        "intervals": ("layer", np.array([int(r["intervals"]) for r in done], dtype=np.int32)),
        "error_bound": ("layer", np.array([float(r["error_bound"]) for r in done])),
        "answer_prob": ("answer_position", clean.answer_prob.cpu().numpy())})
    ds.attrs.update(steps=steps, rule=RULES[rule], target="sum of answer-token probabilities (teacher-forced)",
                    baseline=BASELINES[baseline].format(site=SITES.get(site, f"{site} output")),
                    **({"tolerance": tolerance, "max_steps": max_steps} if rule == "adaptive-trapezoid" else {}))
    return ds
