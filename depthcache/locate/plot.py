"""Heatmaps of location maps: layer × position with the input tokens as x tick labels, as in the paper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from depthcache.analyze.plotting import figure, layer_axis, legend_outside, save
from depthcache.errors import DepthcacheError
from depthcache.locate.maps import MAP_ATTR, item_info, read_map
from depthcache.store.io import model_display_name

LOOK = {"max_prob_change": ("max |Δ p(answer)|", "Residual erasure", "viridis"),
        "max_distribution_l2": ("max ‖Δ p‖₂ (next-token distribution)", "Residual erasure", "viridis"),
        "attribution": ("attribution", "Integrated gradients", "RdBu_r")}


def tick_label(token: str) -> str:
    """A token as a readable tick label: whitespace made visible."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or "∅"


def heatmap(m: xr.Dataset, kind: str, model: str, folder: Path, name: str) -> Path:
    """One prompt's map (dims layer, position) as a PNG."""
    var = next(name for name in LOOK if name in m)
    label, title, cmap = LOOK[var]
    info = item_info(m)
    n, n_prompt = int(info["n_positions"]), int(info["n_prompt_tokens"])
    values = m[var].values[:, :n]
    tokens = [tick_label(str(t)) for t in m.token.values[:n]]
    fig, (ax,) = figure(width=max(4.5, 0.32 * n + 2.5), height=max(3.6, 0.16 * m.sizes["layer"] + 1.6))
    limit = float(np.nanmax(np.abs(values))) or 1.0
    bounds = {"vmin": -limit, "vmax": limit} if kind == "igrad" else {"vmin": 0.0, "vmax": limit}
    image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest", **bounds)
    ax.set_xticks(range(n), tokens, rotation=90, fontsize=8)
    layers = [int(v) for v in m.layer.values]
    every = -(-len(layers) // 16)  # at most 16 ticks, each a layer's own number (maps of --layers skip some)
    ax.set_yticks(range(0, len(layers), every), [str(v) for v in layers[::every]], fontsize=8)
    ax.set_ylabel("layer")
    if n_prompt < n:
        ax.axvline(n_prompt - 0.5, color="black", linewidth=0.8, linestyle="--")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(f"{title} — {model}\n{info['prompt']!r} → {info['answer']!r}", fontsize=9)
    return save(fig, folder, name)


def plot_map(ds: xr.Dataset, kind: str, folder: Path) -> list[Path]:
    """Heatmaps of a map dataset: one PNG, or one per item of a batch map."""
    model = model_display_name(ds.attrs[MAP_ATTR]["model"])
    if "item" not in ds.dims:
        return [heatmap(ds, kind, model, folder, kind)]
    return [heatmap(ds.sel(item=item), kind, model, folder, f"{kind}-{item}") for item in ds.item.values]


def plot_hop_depth(ds: xr.Dataset, folder: Path) -> Path:
    """The paper's multi-hop panels: per hop count, the max over items of the later-layer effect and of the output
    change for each skipped layer, and the depth scores of both profiles (in layers, as the paper plots them)."""
    model = model_display_name(ds.attrs[MAP_ATTR]["model"])
    fig, (later, output, scores) = figure(3, width=5.0, height=3.4)
    width = 0.8 / ds.sizes["hops"]
    for i, hops in enumerate(ds.hops.values):
        x = ds.skipped_layer.values + (i - (ds.sizes["hops"] - 1) / 2) * width
        label = f"{hops} hop{'s' if hops != 1 else ''} (n={int(ds.n_items.sel(hops=hops))})"
        later.bar(x, ds.later_effect_max.sel(hops=hops).values, width, label=label)
        output.bar(x, ds.output_l2_max.sel(hops=hops).values, width, label=label)
    later.set(xlabel="Layer skipped (prompt positions)", ylabel="later-layer effect ‖Δd_l‖ / ‖d_l‖\n(max over items)")
    output.set(xlabel="Layer skipped (prompt positions)", ylabel="output change ‖Δp‖₂\n(max over items)")
    for ax in (later, output):
        layer_axis(ax)
    depth = ds.sizes["layer"]
    positions = np.arange(ds.sizes["hops"])
    scores.bar(positions - 0.2, ds.depth_score_later_max.values * depth, 0.4, label="layer effect")
    scores.bar(positions + 0.2, ds.depth_score_output_max.values * depth, 0.4, label="output effect")
    scores.set(xticks=positions, xticklabels=[str(h) for h in ds.hops.values], xlabel="hops",
               ylabel="depth score (layer, centre of mass)")
    legend_outside(output)
    legend_outside(scores)
    fig.suptitle(f"Multi-hop depth, the paper's measure (skip at the prompt, measure at the answer) — {model}",
                 fontsize=9)
    return save(fig, folder, "hop-depth")


def plot_map_store(location: str, name: str, out_dir: str | None = None) -> list[Path]:
    """``depthcache plot MAP.zarr erasure|igrad``: draw a location-map store's heatmaps."""
    ds = read_map(location)
    kind = ds.attrs[MAP_ATTR]["kind"]
    if name != kind:
        raise DepthcacheError(f"{location} holds a location map of kind {kind!r}: plot it with `depthcache plot {location} {kind}`")
    here = Path(location.rstrip("/"))
    folder = Path(out_dir) if out_dir else here.with_name(f"{here.name.removesuffix('.zarr')}.plots")
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_hop_depth(ds, folder)] if kind == "hop-depth" else plot_map(ds, kind, folder)
