"""residual-norms: how large the residual stream is entering each layer (the denominator of every ratio)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.reduce import (
    lazy_interval,
    masked_max,
    norm,
    token_pieces,
    token_weights,
    weighted_mean,
    weighted_std,
    windows_of,
)
from depthcache.analyze.registry import Level, Resamples, analysis
from depthcache.store.reader import Store


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """Mean (± std) and max residual norm per layer boundary."""
    fig, (ax,) = plotting.figure()
    x = result.relative_depth.values
    floor = plotting.band_floor(result.mean_norm.values)
    lower, upper, clipped = plotting.band_edges(result.mean_norm.values, result.std_norm.values, floor)
    line, = ax.plot(x, result.mean_norm, marker="o", label="mean ‖h‖")
    ax.fill_between(x, lower, upper, alpha=0.2, color=line.get_color(),
                    label="± std" + (" (cut at the axis)" if clipped else ""))
    if "mean_norm_lo" in result:
        ax.fill_between(x, result.mean_norm_lo.values, result.mean_norm_hi.values, alpha=0.5, color="tab:orange",
                        lw=0, label="mean: " + plotting.band_note(result).removeprefix(", bands: "))
    ax.plot(x, result.max_norm, ls="--", label="max ‖h‖")
    ax.set(xlabel="relative depth (layer / L; 1 = after the last layer)", ylabel="residual norm", yscale="log",
           ylim=(floor, None), title=plotting.model_title(result.attrs, "Residual stream norm"))
    plotting.legend_outside(ax)
    return [plotting.save(fig, folder, "residual-norms")]


@analysis("residual-norms", "Norm of the residual stream entering each layer (mean, std, max over tokens).",
          plot=plot)
def residual_norms(store: Store, include_first: bool = False, ci_resamples: Resamples = 1000, ci_seed: int = 0,
                   ci_level: Level = 0.95) -> xr.Dataset:
    """Per layer boundary (the stored layers' inputs, then the final residual): mean, std and max of ‖h‖, the mean
    with a percentile-bootstrap interval over windows (``ci_*``)."""
    store.require("resid_pre", "resid_final")
    ds = store.ds
    h = da.concatenate([ds.resid_pre.data, ds.resid_final.data[None]], axis=0)
    norms = norm(h)
    w = token_weights(ds, include_first)
    seq = ds.seq_id.values
    sums, ids = token_pieces(norms, w, seq)
    counts, _ = token_pieces(w[None], w, seq)
    sums_w, counts_w = windows_of(sums, ids), windows_of(counts, ids)[:, 0]
    lo, hi = lazy_interval(sums_w, counts_w, ci_resamples, ci_seed, ci_level)
    layers = np.append(ds.layer.values, store.n_layers)
    return xr.Dataset(
        {"mean_norm": ("layer", weighted_mean(norms, w)), "std_norm": ("layer", weighted_std(norms, w)),
         "max_norm": ("layer", masked_max(norms, w)), "mean_norm_lo": ("layer", lo), "mean_norm_hi": ("layer", hi),
         "sum_by_window": (("window", "layer"), sums_w), "tokens_by_window": ("window", counts_w)},
        coords={"layer": layers, "relative_depth": ("layer", layers / store.n_layers), "window": np.unique(ids)},
        attrs={"include_first": int(include_first),
               "ci": f"{ci_level:g} percentile bootstrap over {len(np.unique(ids))} windows, {ci_resamples} "
                     f"resamples, seed {ci_seed}",
               "description": "layer = index of the layer the residual enters; layer L = after the last layer; "
                              "mean_norm_lo/hi: percentile-bootstrap interval of the mean over windows (attr ci); "
                              "sum_by_window / tokens_by_window: each window's sum of ‖h‖ and its tokens"})
