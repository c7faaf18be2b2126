"""contributions: how much each sublayer adds to the residual, and in which direction (docs/analyses.md).

Per token t and stored layer l, with h = resid_pre[l], a = attn_out[l], m = mlp_out[l], d = a + m:
relative contributions ‖a‖/‖h‖, ‖m‖/‖h + a‖ (‖m‖/‖h‖ for parallel-residual models, whose MLP reads h), ‖d‖/‖h‖;
cosines cos(a, h), cos(m, h + a) (cos(m, h) when parallel), cos(d, h); the norms ‖h‖, ‖a‖, ‖m‖, ‖d‖; and how much
the layer turns the residual, cos(h + d, h). Each per-token value is reduced over tokens (mean, std, max; float64)
overall and per log-spaced position bucket. Every chunk is reduced to small partial sums in one pass over the data.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.reduce import (
    as_float32,
    bucket_partials,
    combine_partials,
    lazy_interval,
    position_buckets,
    run_starts,
    scratch,
    window_pieces,
    windows_of,
)
from depthcache.analyze.registry import Level, Resamples, analysis
from depthcache.store.layout import is_part
from depthcache.store.reader import Store

SUBLAYERS = ("attn", "mlp", "layer")
# per-token quantities, in the order of the partials' quantity axis
QUANTITIES = ("rel_attn", "rel_mlp", "rel_layer", "cos_attn", "cos_mlp", "cos_layer",
              "norm_attn", "norm_mlp", "norm_layer", "norm_resid", "turn_cos")


def rows_dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row dot product over the last axis, float64 result of a float32 product."""
    return np.vecdot(x, y).astype(np.float64)


def layer_quantities(h: np.ndarray, a: np.ndarray, m: np.ndarray, parallel: bool) -> np.ndarray:
    """(len(QUANTITIES), tokens) float64 for one layer's float32 (tokens, d_model) blocks."""
    d = np.add(a, m, out=scratch("d", a.shape))
    hh, aa, mm, dd, ah, dh = (rows_dot(x, y) for x, y in ((h, h), (a, a), (m, m), (d, d), (a, h), (d, h)))
    if parallel:
        into, m_dot = hh, rows_dot(m, h)
    else:
        mid = np.add(h, a, out=scratch("mid", h.shape))
        into, m_dot = rows_dot(mid, mid), rows_dot(m, mid)
    nh, na, nm, nd, ninto = np.sqrt(hh), np.sqrt(aa), np.sqrt(mm), np.sqrt(dd), np.sqrt(into)
    n_next = np.sqrt(np.maximum(hh + 2 * dh + dd, 0.0))  # ‖h + d‖
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.stack([na / nh, nm / ninto, nd / nh, ah / (na * nh), m_dot / (nm * ninto), dh / (nd * nh),
                         na, nm, nd, nh, (hh + dh) / (n_next * nh)])


def part_quantities(h: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """(3 · len(parts), tokens) float64: ‖p‖/‖h‖, cos(p, h) and ‖p‖ of each branch module's part p (a store made
    with --sites parts: Falcon-H1's Mamba and attention apart), all against the layer input h."""
    nh = np.sqrt(rows_dot(h, h))
    rows = []
    for part in parts:
        npart = np.sqrt(rows_dot(part, part))
        with np.errstate(divide="ignore", invalid="ignore"):
            rows += [npart / nh, rows_dot(part, h) / (npart * nh), npart]
    return np.stack(rows) if rows else np.empty((0, h.shape[0]))


def chunk_partials(h: np.ndarray, a: np.ndarray, m: np.ndarray, position: np.ndarray, seq: np.ndarray,
                   *parts: np.ndarray, parallel: bool, include_first: bool, edges: np.ndarray) -> np.ndarray:
    """(pieces, 4, quantity, layer, bucket) count/sum/sum of squares/max of every quantity over each window piece
    (a run of one seq_id) of one token chunk: the per-window partial sums the intervals resample."""
    values = np.stack([np.concatenate([
        layer_quantities(as_float32(h[i], "h"), as_float32(a[i], "a"), as_float32(m[i], "m"), parallel),
        part_quantities(as_float32(h[i], "h"), [as_float32(p[i], f"p{j}") for j, p in enumerate(parts)])])
        for i in range(h.shape[0])], axis=1)
    bounds = [*run_starts(seq), len(seq)]
    return np.stack([bucket_partials(values[..., lo:hi], position[lo:hi], include_first, edges)
                     for lo, hi in zip(bounds[:-1], bounds[1:])])


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """Paper-style figure (relative contribution and cosine per sublayer vs layer) and the per-position view."""
    layers = result.layer.values
    depth = int(result.attrs["n_layers"])
    first = "included" if result.attrs["include_first"] else "excluded"
    fig, (rel, cos) = plotting.figure(2)
    floor = plotting.band_floor(result.rel_mean.values)
    clipped = False
    for sub in result.sublayer.values:  # attn, mlp, layer, then any part_<module> (dashed)
        r = result.sel(sublayer=sub)
        line, = rel.plot(layers, r.rel_mean, marker="o", ms=3, label=sub, ls="--" if is_part(sub) else "-")
        lower, upper, cut = plotting.band_edges(r.rel_mean.values, r.rel_std.values, floor)
        rel.plot(layers, lower, lw=0.6, ls=":", color=line.get_color())
        rel.plot(layers, upper, lw=0.6, ls=":", color=line.get_color())
        clipped |= cut
        plotting.interval_band(rel, result, "rel_mean", line.get_color(), layers, sublayer=sub)
        line, = cos.plot(layers, r.cos_mean, marker="o", ms=3, label=sub)
        plotting.interval_band(cos, result, "cos_mean", line.get_color(), layers, sublayer=sub)
    rel.set(ylabel="‖contribution‖ / ‖residual‖ (mean)", yscale="log", ylim=(floor, None),
            title="Relative contribution (dotted: ± std over tokens" + (", cut at the axis" if clipped else "") + ")")
    cos.axhline(0, color="grey", lw=0.8)
    cos.set(ylabel="mean cos(contribution, residual)", title="Cosine with the residual")
    for ax in (rel, cos):
        ax.set_xlabel("layer")
        plotting.layer_axis(ax)
        ax.secondary_xaxis("top", functions=(lambda x: x / depth, lambda x: x * depth)).set_xlabel(
            "relative depth l / L")
    plotting.legend_outside(cos, title="sublayer")
    fig.suptitle(plotting.model_title(result.attrs, f"Contributions to the residual ({int(result.tokens_used)} "
                                                    f"tokens, position 0 {first}{plotting.band_note(result)})"),
                 fontsize=9)
    paths = [plotting.save(fig, folder, "contributions")]
    fig, (ax,) = plotting.figure(width=6.5)
    by_pos = result.rel_mean_by_position.sel(sublayer="layer")
    for bucket in result.position_bucket.values:
        values = by_pos.sel(position_bucket=bucket)
        if np.isfinite(values).any():
            ax.plot(layers, values, label=str(bucket))
    ax.set(xlabel="layer", ylabel="mean ‖d_l‖ / ‖h_l‖", yscale="log",
           title=plotting.model_title(result.attrs, "Whole-layer relative contribution by token position"))
    plotting.layer_axis(ax)
    plotting.legend_outside(ax, title="positions")
    paths.append(plotting.save(fig, folder, "contributions-by-position"))
    return paths


@analysis("contributions", "Relative norm contribution and cosine of attention, MLP and whole layer to the "
          "residual, per layer (and per position bucket).", plot=plot)
def contributions(store: Store, include_first: bool = False, ci_resamples: Resamples = 1000, ci_seed: int = 0,
                  ci_level: Level = 0.95) -> xr.Dataset:
    """Per sublayer and layer: mean/std/max of the relative contribution, mean/std cosine, norms, turning; the
    means with percentile-bootstrap intervals over windows (``ci_*``)."""
    store.require("resid_pre", "attn_out", "mlp_out")
    ds = store.ds
    parallel = bool(store.attrs["model"].get("parallel_residual", False))
    edges = position_buckets(int(store.attrs["options"]["seq_len"]))
    tokens = ds.resid_pre.data.chunks[1]
    sizes, piece_ids = window_pieces(ds.seq_id.values, tokens)
    seq = ds.seq_id.data.rechunk((tokens,))
    parts = sorted(n for n in ds.data_vars if is_part(n))  # --sites parts: each branch module as a sublayer too
    quantities = (*QUANTITIES, *(f"{k}_{p}" for p in parts for k in ("rel", "cos", "norm")))
    sublayers = (*SUBLAYERS, *parts)
    part_args = [arg for p in parts for arg in (ds[p].data, "ltd")]
    partials = da.blockwise(chunk_partials, "tsqlb", ds.resid_pre.data, "ltd", ds.attn_out.data, "ltd",
                            ds.mlp_out.data, "ltd", ds.position.data.rechunk((tokens,)), "t", seq, "t", *part_args,
                            new_axes={"s": 4, "q": len(quantities), "b": len(edges) - 1}, adjust_chunks={"t": sizes},
                            concatenate=True, dtype=np.float64, meta=np.empty((0,) * 5),
                            parallel=parallel, include_first=include_first, edges=edges)
    stats = combine_partials(partials)  # mean/std/max (quantity, layer, bucket) and overall (quantity, layer)
    sums_w = windows_of(partials[:, 1].sum(axis=-1), piece_ids)  # (window, quantity, layer)
    counts_w = windows_of(partials[:, 0, 0, 0].sum(axis=-1), piece_ids)  # (window,)
    lo, hi = lazy_interval(sums_w, counts_w, ci_resamples, ci_seed, ci_level)
    q = {name: i for i, name in enumerate(quantities)}
    sub = [q[f"rel_{s}"] for s in sublayers], [q[f"cos_{s}"] for s in sublayers], [q[f"norm_{s}"] for s in sublayers]
    rel, cos, nrm = sub
    layers = ds.layer.values
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])]
    sl, slb = ("sublayer", "layer"), ("sublayer", "layer", "position_bucket")
    return xr.Dataset(
        {"rel_mean": (sl, stats["mean"][rel]), "rel_std": (sl, stats["std"][rel]), "rel_max": (sl, stats["max"][rel]),
         "cos_mean": (sl, stats["mean"][cos]), "cos_std": (sl, stats["std"][cos]),
         "norm_mean": (sl, stats["mean"][nrm]), "norm_max": (sl, stats["max"][nrm]),
         "resid_norm_mean": ("layer", stats["mean"][q["norm_resid"]]),
         "resid_norm_max": ("layer", stats["max"][q["norm_resid"]]),
         "turn_cos_mean": ("layer", stats["mean"][q["turn_cos"]]),
         "turn_cos_std": ("layer", stats["std"][q["turn_cos"]]),
         "rel_mean_lo": (sl, lo[rel]), "rel_mean_hi": (sl, hi[rel]),
         "cos_mean_lo": (sl, lo[cos]), "cos_mean_hi": (sl, hi[cos]),
         "norm_mean_lo": (sl, lo[nrm]), "norm_mean_hi": (sl, hi[nrm]),
         "resid_norm_mean_lo": ("layer", lo[q["norm_resid"]]), "resid_norm_mean_hi": ("layer", hi[q["norm_resid"]]),
         "turn_cos_mean_lo": ("layer", lo[q["turn_cos"]]), "turn_cos_mean_hi": ("layer", hi[q["turn_cos"]]),
         "sum_by_window": (("window", "quantity", "layer"), sums_w), "tokens_by_window": ("window", counts_w),
         "rel_mean_by_position": (slb, stats["mean_by_bucket"][rel]),
         "cos_mean_by_position": (slb, stats["mean_by_bucket"][cos]),
         "tokens_by_position": ("position_bucket", stats["count_by_bucket"]),
         "tokens_used": ((), stats["count"])},
        coords={"sublayer": np.array(sublayers, dtype=object), "layer": layers, "window": np.unique(piece_ids),
                "quantity": np.array(quantities, dtype=object), "relative_depth": ("layer", layers / store.n_layers),
                "position_bucket": np.array(labels, dtype=object), "bucket_start": ("position_bucket", edges[:-1]),
                "bucket_end": ("position_bucket", edges[1:] - 1)},
        attrs={"include_first": int(include_first), "parallel_residual": int(parallel), "n_layers": store.n_layers,
               "ci": f"{ci_level:g} percentile bootstrap over {len(np.unique(piece_ids))} windows, {ci_resamples} "
                     f"resamples, seed {ci_seed}",
               "tokens": int(ds.sizes["token"]),
               "description": "per token: rel = ‖a‖/‖h‖ (attn), ‖m‖/‖h+a‖ (mlp; ‖m‖/‖h‖ if parallel_residual), "
                              "‖d‖/‖h‖ (layer, d = a+m); cos = cos(a,h), cos(m,h+a) (cos(m,h) if parallel), "
                              "cos(d,h); norm = ‖a‖, ‖m‖, ‖d‖; sublayers part_<module> (stores made with --sites "
                              "parts): ‖p‖/‖h‖, cos(p,h), ‖p‖ of that branch module alone; resid_norm = ‖h‖; "
                              "turn_cos = cos(h+d, h). "
                              "mean/std/max over tokens (float64); position 0 of each window "
                              f"{'included' if include_first else 'excluded'} (parameter include_first); "
                              "*_by_position: the mean per position bucket [bucket_start, bucket_end]; *_lo/*_hi: the "
                              "means' percentile-bootstrap interval over windows (attr ci); sum_by_window / "
                              "tokens_by_window: each window's sums of every quantity and its tokens"})
