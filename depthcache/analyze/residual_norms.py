"""residual-norms: how large the residual stream is entering each layer (the denominator of every ratio)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.reduce import (
    masked_max,
    norm,
    token_weights,
    weighted_mean,
    weighted_std,
)
from depthcache.analyze.registry import analysis
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
    ax.plot(x, result.max_norm, ls="--", label="max ‖h‖")
    ax.set(xlabel="relative depth (layer / L; 1 = after the last layer)", ylabel="residual norm", yscale="log",
           ylim=(floor, None), title=plotting.model_title(result.attrs, "Residual stream norm"))
    plotting.legend_outside(ax)
    return [plotting.save(fig, folder, "residual-norms")]


@analysis("residual-norms", "Norm of the residual stream entering each layer (mean, std, max over tokens).",
          plot=plot)
def residual_norms(store: Store, include_first: bool = False) -> xr.Dataset:
    """Per layer boundary (the stored layers' inputs, then the final residual): mean, std and max of ‖h‖."""
    store.require("resid_pre", "resid_final")
    ds = store.ds
    h = da.concatenate([ds.resid_pre.data, ds.resid_final.data[None]], axis=0)
    norms = norm(h)
    w = token_weights(ds, include_first)
    layers = np.append(ds.layer.values, store.n_layers)
    return xr.Dataset(
        {"mean_norm": ("layer", weighted_mean(norms, w)), "std_norm": ("layer", weighted_std(norms, w)),
         "max_norm": ("layer", masked_max(norms, w))},
        coords={"layer": layers, "relative_depth": ("layer", layers / store.n_layers)},
        attrs={"include_first": int(include_first),
               "description": "layer = index of the layer the residual enters; layer L = after the last layer"})
