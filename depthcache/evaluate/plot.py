"""The pruning chart: likelihood- and generation-based scores against the number of layers removed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from depthcache.analyze import plotting


def plot_prune(ds: xr.Dataset, folder: Path, name: str = "prune") -> Path:
    """Choice accuracy and exact match (left axis, 0..1) and mean gold log-prob (right axis) per layers removed."""
    fig, (ax,) = plotting.figure(width=7.0, height=4.2)
    x = ds.n_removed.values
    lines = []
    for var, label, style in (("choice_accuracy", "likelihood: accuracy among choices", "o-"),
                              ("exact_match_rate", "generation: exact match (greedy)", "s-")):
        if np.isfinite(ds[var].values).any():
            lines += ax.plot(x, ds[var].values, style, label=label)
    ax.set(xlabel="layers removed (the layer removed at each step below the count)", ylabel="accuracy",
           ylim=(-0.03, 1.03))
    ax.set_xticks(x, [f"{k}\n−{layer}" if layer >= 0 else "0\nnone" for k, layer in
                      zip(x, ds.removed_layer.values)], fontsize=7)
    if np.isfinite(ds.mean_gold_logprob.values).any():
        right = ax.twinx()
        lines += right.plot(x, ds.mean_gold_logprob.values, "^--", color="tab:gray",
                            label="likelihood: mean log-prob of the gold answer")
        right.set_ylabel("mean gold log-prob (nats)")
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower left")
    candidates = json.loads(ds.attrs["candidates"])
    ax.set_title(f"{ds.attrs['model']} on {ds.attrs['task']} ({ds.sizes['item']} items): removing layers "
                 f"{min(candidates)}–{max(candidates)}, order {ds.attrs['order']}", fontsize=9)
    return plotting.save(fig, folder, name)
