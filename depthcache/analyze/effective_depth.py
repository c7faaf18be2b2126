"""effective-depth: three scalar cutoffs summarising how deep a model computes (analyses.md §7).

From the store's contributions and logit-lens results (the cached ones when present, else computed):
- the first layer where cos(d_l, h_l) (mean over tokens, whole layer) has the opposite sign of the layer before it;
- the first layer whose input's logit-lens KL to the output falls below 0.1 × the maximum KL over layers;
- the first layer whose input's logit-lens top-5 overlap with the output exceeds 0.2.
Only the stored layers' inputs are candidates (not the final residual, which is the output itself); each cutoff is
a layer index and a fraction of depth (layer / L), or -1 and NaN with a note when it is never reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.registry import Count, analysis
from depthcache.analyze.runner import cached_result, run
from depthcache.store.reader import Store

KL_FRACTION = 0.1
TOP5_THRESHOLD = 0.2
CUTOFFS = {"cos_zero": "cos(d_l, h_l) changes sign", "kl_drop": f"logit-lens KL < {KL_FRACTION}×max",
           "top5_rise": f"logit-lens top-5 overlap > {TOP5_THRESHOLD}"}


def first(mask: np.ndarray) -> int:
    """Index of the first True entry, or -1."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else -1


def cutoff_indices(cos: np.ndarray, kl: np.ndarray, top5: np.ndarray) -> dict[str, int]:
    """Positions (into the given per-layer arrays) of the three cutoffs, -1 where never reached."""
    sign_change = np.signbit(cos[1:]) != np.signbit(cos[:-1])
    return {"cos_zero": first(sign_change) + 1 if sign_change.any() else -1,
            "kl_drop": first(kl < KL_FRACTION * np.nanmax(kl)),
            "top5_rise": first(top5 > TOP5_THRESHOLD)}


def summarise(contrib: xr.Dataset, lens: xr.Dataset, n_layers: int) -> xr.Dataset:
    """The cutoffs (layer, fraction of depth) plus the per-layer curves they come from, on the logit lens's layers."""
    cos = contrib.cos_mean.sel(sublayer="layer")
    inputs = lens.sel(layer=lens.layer.values < n_layers)
    found = cutoff_indices(cos.values, inputs.kl_mean.values, inputs.top5_overlap.values)
    layers = {"cos_zero": cos.layer.values, "kl_drop": inputs.layer.values, "top5_rise": inputs.layer.values}
    scalars: dict[str, Any] = {}
    notes = []
    for key, index in found.items():
        layer = int(layers[key][index]) if index >= 0 else -1
        scalars[f"{key}_layer"] = ((), layer)
        scalars[f"{key}_depth"] = ((), layer / n_layers if index >= 0 else np.nan)
        if index < 0:
            notes.append(f"{key}: never reached ({CUTOFFS[key]} at no stored layer)")
    lens_layers = lens.layer.values
    return xr.Dataset(
        scalars | {"cos_mean": contrib.cos_mean.reindex(layer=lens_layers).drop_vars("relative_depth"),
                   "kl_mean": ("layer", lens.kl_mean.values), "top5_overlap": ("layer", lens.top5_overlap.values)},
        coords={"layer": lens_layers, "relative_depth": ("layer", lens_layers / n_layers)},
        attrs={"n_layers": n_layers, "notes": "; ".join(notes) or "every cutoff reached",
               "inputs": f"contributions {json_params(contrib)}, logit-lens {json_params(lens)}",
               "description": "cos_zero: first stored layer whose mean cos(d_l, h_l) has the opposite sign of the "
                              "previous stored layer's; kl_drop: first layer whose input's mean logit-lens KL is "
                              f"below {KL_FRACTION} × its max over the stored layers; top5_rise: first layer whose "
                              f"input's mean top-5 overlap exceeds {TOP5_THRESHOLD}; *_layer = -1 and *_depth = "
                              "NaN when never reached; *_depth = layer / L"})


def json_params(result: xr.Dataset) -> str:
    """The parameters a cached result was computed with, as recorded in its attrs."""
    import json

    return json.dumps(json.loads(result.attrs.get("depthcache_analysis", "{}")).get("params", {}), sort_keys=True)


def describe_cutoffs(result: xr.Dataset) -> str:
    """One line: each cutoff as 'layer l (fraction of depth)' or 'never'."""
    parts = []
    for key, what in CUTOFFS.items():
        layer = int(result[f"{key}_layer"])
        parts.append(f"{what}: " + (f"layer {layer} ({float(result[f'{key}_depth']):.2f} of depth)"
                                    if layer >= 0 else "never"))
    return "; ".join(parts)


def info_line(store: Store) -> str | None:
    """The cutoffs from a cached effective-depth result, or from cached contributions and logit-lens results."""
    result = cached_result("effective-depth", store)
    if result is None:
        contrib, lens = cached_result("contributions", store), cached_result("logit-lens", store)
        if contrib is None or lens is None:
            return None
        result = summarise(contrib, lens, store.n_layers)
    return describe_cutoffs(result)


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """The three curves with their cutoffs marked."""
    fig, axes = plotting.figure(3, width=4.2)
    depth = int(result.attrs["n_layers"])
    curves = (("cos_zero", result.cos_mean.sel(sublayer="layer"), "mean cos(d_l, h_l)", 0.0),
              ("kl_drop", result.kl_mean, "logit-lens mean KL [nats]", KL_FRACTION * float(
                  result.kl_mean.sel(layer=result.layer < depth).max())),
              ("top5_rise", result.top5_overlap, "logit-lens top-5 overlap", TOP5_THRESHOLD))
    for ax, (key, values, label, level) in zip(axes, curves):
        ax.plot(result.layer.values, values, marker="o", ms=3)
        ax.axhline(level, color="grey", lw=0.8, ls="--")
        layer = int(result[f"{key}_layer"])
        if layer >= 0:
            ax.axvline(layer, color="tab:red", lw=1)
        ax.set(xlabel="layer", ylabel=label, title=f"{CUTOFFS[key]}: " + (f"layer {layer}" if layer >= 0 else "never"))
    fig.suptitle(plotting.model_title(result.attrs, "Effective depth"), fontsize=9)
    return [plotting.save(fig, folder, "effective-depth")]


@analysis("effective-depth", "Scalar cutoffs: where cos(d_l, h_l) changes sign, where the logit-lens KL drops "
          "below 0.1×max, where top-5 overlap exceeds 0.2 (from contributions and logit-lens).", plot=plot)
def effective_depth(store: Store, include_first: bool = False, max_tokens: Count | None = None) -> xr.Dataset:
    """The three cutoffs, from cached contributions/logit-lens results with these parameters (computed if absent)."""
    inputs = []
    for name, params in (("contributions", {"include_first": include_first}),
                         ("logit-lens", {"include_first": include_first, "max_tokens": max_tokens})):
        cached = cached_result(name, store, params)
        inputs.append(cached if cached is not None else run(name, store, **params))
    return summarise(*inputs, store.n_layers)
