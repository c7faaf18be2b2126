"""effective-depth: three scalar cutoffs summarising how deep a model computes (docs/analyses.md).

From the store's contributions and logit-lens results (computed, or taken from the cache, with the same parameters,
results folder and scheduler as effective-depth itself):
- cos_zero: where the mean cos(d_l, h_l) of the whole layer changes sign for good. Layer 0 is left out (its input
  is the token embedding, whose sign says nothing about the later layers); the reference sign is that of the first
  stored layer after it, and the cutoff is the first later stored layer from which every stored layer up to the
  last has the other sign (a dip across zero that comes back is not the change);
- kl_drop: the first residual boundary whose logit-lens KL to the output is at most KL_FRACTION × the largest KL
  over every boundary, the final residual (layer L, KL 0: the output itself) included, in the scale and as a
  candidate, so a curve that reaches 0 at the output always has a cutoff;
- top5_rise: the first residual boundary (the final residual included) whose logit-lens top-5 overlap with the
  output exceeds TOP5_THRESHOLD.
Each cutoff is a layer index and a fraction of depth (layer / L), or -1 and NaN with a note when it is never reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.bootstrap import LEVEL, N_RESAMPLES, SEED, percentile_interval, replicates
from depthcache.analyze.registry import Count, Level, Resamples, analysis
from depthcache.analyze.runner import cached, run
from depthcache.store.reader import Store

KL_FRACTION = 0.1
TOP5_THRESHOLD = 0.2
CUTOFFS = {"cos_zero": "cos(d_l, h_l) changes sign for good", "kl_drop": f"logit-lens KL ≤ {KL_FRACTION}×max",
           "top5_rise": f"logit-lens top-5 overlap > {TOP5_THRESHOLD}"}


def first(mask: np.ndarray) -> int:
    """Index of the first True entry, or -1."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else -1


def lasting_flip(cos: np.ndarray, start: int) -> int:
    """Index of the first entry after ``start`` from which every entry to the end has the other sign than
    ``cos[start]``, or -1."""
    flipped = np.signbit(cos) != np.signbit(cos[start])
    kept = np.flip(np.logical_and.accumulate(np.flip(flipped)))  # kept[i]: flipped from i to the end
    return first(kept[start + 1:]) + start + 1 if kept[start + 1:].any() else -1


def cutoff_indices(cos: np.ndarray, cos_layers: np.ndarray, kl: np.ndarray, top5: np.ndarray) -> dict[str, int]:
    """Positions of the three cutoffs, -1 where never reached: into ``cos`` (per stored layer, with their indices
    ``cos_layers``) and into ``kl``/``top5`` (per boundary, the final residual last)."""
    return {"cos_zero": lasting_flip(cos, first(cos_layers > 0)) if (cos_layers > 0).any() else -1,
            "kl_drop": first(kl <= KL_FRACTION * np.nanmax(kl)),
            "top5_rise": first(top5 > TOP5_THRESHOLD)}


def cutoff_replicates(contrib: xr.Dataset, lens: xr.Dataset, n_layers: int, n_resamples: int,
                      seed: int) -> dict[str, np.ndarray]:
    """Per cutoff, its depth (layer / L; inf when never reached) in each bootstrap resample of windows: the curves
    recomputed from the results' per-window sums with ``replicates`` (the same draws as their own intervals)."""
    q = list(contrib.quantity.values).index("cos_layer")
    cos = replicates(contrib.sum_by_window.values[:, q], contrib.tokens_by_window.values, n_resamples=n_resamples,
                     seed=seed)  # (resample, layer)
    lens_curves = replicates(lens.sum_by_window.values, lens.tokens_by_window.values, n_resamples=n_resamples,
                             seed=seed)  # (resample, stat: kl, top1, top5, boundary)
    layers = {"cos_zero": contrib.layer.values, "kl_drop": lens.layer.values, "top5_rise": lens.layer.values}
    out: dict[str, list[float]] = {key: [] for key in CUTOFFS}
    for c, curves in zip(cos, lens_curves):
        for key, index in cutoff_indices(c, contrib.layer.values, curves[0], curves[2]).items():
            out[key].append(layers[key][index] / n_layers if index >= 0 else np.inf)
    return {key: np.array(values) for key, values in out.items()}


def summarise(contrib: xr.Dataset, lens: xr.Dataset, n_layers: int, n_resamples: int = N_RESAMPLES,
              seed: int = SEED, level: float = LEVEL) -> xr.Dataset:
    """The cutoffs (layer, fraction of depth) with percentile-bootstrap intervals over windows (when both results
    carry per-window sums), plus the per-layer curves they come from, on the logit lens's layers."""
    cos = contrib.cos_mean.sel(sublayer="layer")
    found = cutoff_indices(cos.values, cos.layer.values, lens.kl_mean.values, lens.top5_overlap.values)
    layers = {"cos_zero": cos.layer.values, "kl_drop": lens.layer.values, "top5_rise": lens.layer.values}
    scalars: dict[str, Any] = {}
    notes = []
    for key, index in found.items():
        layer = int(layers[key][index]) if index >= 0 else -1
        scalars[f"{key}_layer"] = ((), layer)
        scalars[f"{key}_depth"] = ((), layer / n_layers if index >= 0 else np.nan)
        if index < 0:
            notes.append(f"{key}: never reached ({CUTOFFS[key]} nowhere)")
    lens_layers = lens.layer.values
    curves = {"cos_mean": contrib.cos_mean.reindex(layer=lens_layers).drop_vars("relative_depth"),
              "kl_mean": ("layer", lens.kl_mean.values), "top5_overlap": ("layer", lens.top5_overlap.values)}
    with_ci = "sum_by_window" in contrib and "sum_by_window" in lens
    if with_ci:
        for key, samples in cutoff_replicates(contrib, lens, n_layers, n_resamples, seed).items():
            lo, hi = percentile_interval(samples, level, method="inverted_cdf")
            scalars[f"{key}_depth_lo"], scalars[f"{key}_depth_hi"] = ((), float(lo)), ((), float(hi))
        for name in ("kl_mean", "top5_overlap"):
            curves |= {f"{name}_{end}": ("layer", lens[f"{name}_{end}"].values) for end in ("lo", "hi")}
        curves |= {f"cos_mean_{end}": contrib[f"cos_mean_{end}"].reindex(layer=lens_layers).drop_vars("relative_depth")
                   for end in ("lo", "hi")}
    return xr.Dataset(
        scalars | curves,
        coords={"layer": lens_layers, "relative_depth": ("layer", lens_layers / n_layers)},
        attrs={"n_layers": n_layers, "notes": "; ".join(notes) or "every cutoff reached",
               "inputs": f"contributions {json_params(contrib)}, logit-lens {json_params(lens)}",
               "ci": f"{level:g} percentile bootstrap over windows, {n_resamples} resamples, seed {seed} (each "
                     "cutoff recomputed per resample; inf: never reached in that share of resamples)"
                     if with_ci else "none (inputs without per-window sums)",
               "description": "cos_zero: the reference sign is the mean cos(d_l, h_l) of the first stored layer "
                              "l > 0 (layer 0 reads the embedding); the cutoff is the first later stored layer from "
                              "which every stored layer to the last has the other sign; kl_drop: first boundary (layer inputs, "
                              f"then the output, layer L) whose mean logit-lens KL is at most {KL_FRACTION} × its "
                              "max over all boundaries; top5_rise: first boundary whose mean top-5 overlap exceeds "
                              f"{TOP5_THRESHOLD}; *_layer = -1 and *_depth = NaN when never reached; "
                              "*_depth = layer / L; *_depth_lo/hi: its interval (attr ci)"})


def json_params(result: xr.Dataset) -> str:
    """The parameters a cached result was computed with, as recorded in its attrs."""
    import json

    return json.dumps(json.loads(result.attrs.get("depthcache_analysis", "{}")).get("params", {}), sort_keys=True)


def describe_cutoffs(result: xr.Dataset) -> str:
    """One line: each cutoff as 'layer l (fraction of depth, interval)' or 'never'."""
    parts = []
    for key, what in CUTOFFS.items():
        layer = int(result[f"{key}_layer"])
        ci = f"{level_name(result)} {span(result, key)}" if f"{key}_depth_lo" in result else ""
        if layer >= 0:
            text = f"layer {layer} ({float(result[f'{key}_depth']):.2f} of depth" + (f", {ci})" if ci else ")")
        else:
            text = "never" + (f" ({ci})" if ci else "")
        parts.append(f"{what}: {text}")
    return "; ".join(parts)


def level_name(result: xr.Dataset) -> str:
    """'95 % CI' from the result's ci attribute."""
    return f"{float(result.attrs['ci'].split()[0]) * 100:g} % CI"


def span(result: xr.Dataset, key: str) -> str:
    """A cutoff's interval as 'lo–hi' in fractions of depth, 'never' for an end never reached."""
    ends = [float(result[f"{key}_depth_{end}"]) for end in ("lo", "hi")]
    return "–".join("never" if np.isinf(e) else f"{e:.2f}" for e in ends)


def info_line(store: Store, results_dir: str | None = None) -> str | None:
    """The cutoffs from a cached effective-depth result, or from cached contributions and logit-lens results."""
    result = cached("effective-depth", store, results_dir=results_dir)
    if result is None:
        contrib = cached("contributions", store, results_dir=results_dir)
        lens = cached("logit-lens", store, results_dir=results_dir)
        if contrib is None or lens is None:
            return None
        result = summarise(contrib, lens, store.n_layers)
    return describe_cutoffs(result)


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """The three curves with their cutoffs marked."""
    fig, axes = plotting.figure(3, width=4.2)
    curves = (("cos_zero", result.cos_mean.sel(sublayer="layer"), "mean cos(d_l, h_l)", 0.0),
              ("kl_drop", result.kl_mean, "logit-lens mean KL [nats]", KL_FRACTION * float(result.kl_mean.max())),
              ("top5_rise", result.top5_overlap, "logit-lens top-5 overlap", TOP5_THRESHOLD))
    for ax, (key, values, label, level) in zip(axes, curves):
        line, = ax.plot(result.layer.values, values, marker="o", ms=3)
        name = {"cos_zero": "cos_mean", "kl_drop": "kl_mean", "top5_rise": "top5_overlap"}[key]
        if f"{name}_lo" in result:
            band = [result[f"{name}_{end}"] for end in ("lo", "hi")]
            band = [b.sel(sublayer="layer") if "sublayer" in b.dims else b for b in band]
            ax.fill_between(result.layer.values, *band, alpha=0.2, color=line.get_color(), label=level_name(result))
        ax.axhline(level, color="grey", lw=0.8, ls="--")
        layer = int(result[f"{key}_layer"])
        if layer >= 0:
            ax.axvline(layer, color="tab:red", lw=1)
        if f"{key}_depth_lo" in result:
            lo, hi = (float(result[f"{key}_depth_{end}"]) * int(result.attrs["n_layers"]) for end in ("lo", "hi"))
            if np.isfinite(lo):
                ax.axvspan(lo, min(hi, result.layer.values.max()), color="tab:red", alpha=0.12)
        ax.set(xlabel="layer", ylabel=label, title=f"{CUTOFFS[key]}: " + (f"layer {layer}" if layer >= 0 else "never"))
        plotting.layer_axis(ax)
    note = plotting.band_note(result).removeprefix(", ")
    fig.suptitle(plotting.model_title(result.attrs, "Effective depth" + (f" ({note})" if note else "")), fontsize=9)
    return [plotting.save(fig, folder, "effective-depth")]


@analysis("effective-depth", "Scalar cutoffs: where cos(d_l, h_l) changes sign for good, where the logit-lens KL "
          f"drops to {KL_FRACTION}×max, where top-5 overlap exceeds {TOP5_THRESHOLD} (from contributions and "
          "logit-lens).", plot=plot, describe=describe_cutoffs)
def effective_depth(store: Store, include_first: bool = False, max_tokens: Count | None = None,
                    ci_resamples: Resamples = 1000, ci_seed: int = 0, ci_level: Level = 0.95) -> xr.Dataset:
    """The three cutoffs with percentile-bootstrap intervals over windows, from the contributions and logit-lens
    results with these parameters (cached or computed in the caller's results folder and scheduler)."""
    ci = {"ci_resamples": ci_resamples, "ci_seed": ci_seed, "ci_level": ci_level}
    contrib = run("contributions", store, include_first=include_first, **ci)
    lens = run("logit-lens", store, include_first=include_first, max_tokens=max_tokens, **ci)
    return summarise(contrib, lens, store.n_layers, ci_resamples, ci_seed, ci_level)
