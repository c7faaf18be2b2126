"""The pruning chart: likelihood- and generation-based scores against the number of layers removed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from depthcache.analyze import plotting


def chance_accuracy(ds: xr.Dataset) -> float | None:
    """Expected accuracy among choices when guessing: the mean of 1 / (number of choices) over the items that have
    choices (None when none has)."""
    if "n_choices" not in ds.coords or not (ds.n_choices.values > 0).any():
        return None
    counts = ds.n_choices.values[ds.n_choices.values > 0]
    return float(np.mean(1.0 / counts))


def step_label(k: int, layer: int) -> str:
    """A step's tick: the number of layers removed, and below it the layer removed at that step ('full' at 0)."""
    return f"{k}\nfull" if layer < 0 else f"{k}\nL{layer}"


def plot_prune(ds: xr.Dataset, folder: Path, name: str = "prune") -> Path:
    """Choice accuracy and exact match (left axis, 0..1, with the chance level of choosing among the choices) and
    mean gold log-prob (right axis) per number of layers removed."""
    fig, (ax,) = plotting.figure(width=7.0, height=4.8)
    x = ds.n_removed.values
    lines = []
    for var, label, style in (("choice_accuracy", "likelihood: accuracy among choices", "o-"),
                              ("exact_match_rate", "generation: exact match (greedy)", "s-")):
        if np.isfinite(ds[var].values).any():
            lines += ax.plot(x, ds[var].values, style, label=label)
    chance = chance_accuracy(ds)
    if chance is not None and np.isfinite(ds.choice_accuracy.values).any():
        lines.append(ax.axhline(chance, color="tab:blue", linestyle=":", linewidth=1,
                                label=f"chance among choices ({chance:.2f})"))
    ax.set(xlabel="layers removed (below: the layer removed at that step)", ylabel="accuracy", ylim=(-0.03, 1.03))
    ax.set_xticks(x, [step_label(int(k), int(layer)) for k, layer in zip(x, ds.removed_layer.values)], fontsize=7)
    if np.isfinite(ds.mean_gold_logprob.values).any():
        right = ax.twinx()
        lines += right.plot(x, ds.mean_gold_logprob.values, "^--", color="tab:gray",
                            label="likelihood: mean log-prob of the gold answer")
        right.set_ylabel("mean gold log-prob (nats)")
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper center", ncols=2,
              bbox_to_anchor=(0.5, -0.2), frameon=False)
    candidates = json.loads(ds.attrs["candidates"])
    ax.set_title(f"{ds.attrs['model']} on {ds.attrs['task']} ({ds.sizes['item']} items): removing layers "
                 f"{min(candidates)}–{max(candidates)}, order {ds.attrs['order']}", fontsize=9)
    return plotting.save(fig, folder, name)
