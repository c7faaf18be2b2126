"""skip-effects: how skipping a layer changes every later layer's contribution and the output (docs/interventions.md).

For each single-layer skip run (``depthcache extract --skip ...``) of the chosen variant and sublayer, and each
stored layer l: the relative change of the layer's contribution ``‖d_l^skip − d_l^base‖ / max(‖d_l^base‖, 1e-6)``
(``d_l = attn_out + mlp_out``) reduced by max and mean over the measured tokens, and the change of the output
distribution recomputed from ``resid_final`` with the store's head: L2 distance of the softmax probabilities, KL
(base ‖ skip), top-1 changes, and the change of the next token's log-prob. Layers before the skipped one are
unchanged by construction (not even recomputed), so their entries are exactly 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.bootstrap import max_replicates, percentile_interval
from depthcache.analyze.reduce import f32, lazy_interval, masked_max, norm, token_pieces, token_weights, windows_of
from depthcache.analyze.registry import Count, Level, Resamples, analysis
from depthcache.errors import DepthcacheError
from depthcache.store.head import logits_from_residual
from depthcache.store.reader import Store

CLAMP = 1e-6
OUTPUT_SLICE = 128  # tokens per logits block inside a chunk (bounds memory at ~4 × 128 × vocab floats)


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """Heatmaps of the max and mean relative change (skipped layer × affected layer; the colour scale stops at 1 and
    its bar says how many cells lie above) and the output effect per skip."""
    what = f"{result.attrs['variant']} variant, {result.attrs['sublayer']} skipped, {result.attrs['tokens']} tokens"
    paths = []
    for stat, label in (("max", "max"), ("mean", "mean")):
        fig, (heat, bars) = plotting.figure(2, width=5.4, height=4.6)
        values = result[f"{stat}_effect"].values
        above = int((values > 1).sum())
        image = heat.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        heat.set_xticks(*ticks(result.layer.values))
        heat.set_yticks(*ticks(result.skipped_layer.values))
        heat.set(xlabel="Effect @ layer", ylabel="Layer skipped", title=f"{label} over tokens of ‖Δd_l‖ / ‖d_l‖")
        bar = fig.colorbar(image, ax=heat, fraction=0.046, pad=0.03, extend="max" if above else "neither")
        bar.set_label(f"colours stop at 1: {above} of {values.size} cells are above (max {np.nanmax(values):.3g})"
                      if above else "‖Δd_l‖ / ‖d_l‖ (every cell ≤ 1)", fontsize=7)
        output = result.output_l2_max if stat == "max" else result.output_l2_mean
        spread = None
        if stat == "mean" and "output_l2_mean_lo" in result:
            spread = np.abs(np.stack([output.values - result.output_l2_mean_lo.values,
                                      result.output_l2_mean_hi.values - output.values]))
        bars.bar(result.skipped_layer.values, output.values, color="tab:red", yerr=spread, ecolor="black",
                 capsize=1.5)
        bars.set(xlabel="Layer skipped", ylabel=f"{label} ‖p_skip − p_base‖₂",
                 title="Effect on the output distribution")
        plotting.layer_axis(bars)
        note = plotting.band_note(result).replace("bands", "error bars") if stat == "mean" else ""
        fig.suptitle(plotting.model_title(result.attrs, f"Skipping one layer ({what}{note})"), fontsize=9)
        paths.append(plotting.save(fig, folder, "skip-effects" if stat == "max" else "skip-effects-mean"))
    return paths


def ticks(layers: np.ndarray) -> tuple[list[int], list[str]]:
    """Positions and labels of every ~5th layer."""
    step = max(1, len(layers) // 6)
    picked = list(range(0, len(layers), step))
    return picked, [str(layers[i]) for i in picked]


def skip_runs(store: Store, variant: str, sublayer: str) -> list[tuple[int, xr.Dataset, dict[str, Any]]]:
    """(skipped layer, lazy run dataset, intervention) of the store's single-layer skip runs, by layer."""
    found = []
    for name in store.runs():
        ds = store.run(name)
        attrs = ds.attrs["depthcache"]
        spec = attrs.get("intervention") or {}
        if (spec.get("kind"), len(spec.get("layers", ())), spec.get("variant"), spec.get("sublayer")) != \
                ("skip", 1, variant, sublayer):
            continue
        if not attrs["progress"]["complete"]:
            raise DepthcacheError(f"run {name!r} of {store.location} is incomplete ({attrs['progress']['tokens_committed']}"
                                  f" of {attrs['layout']['n_tokens']} tokens): finish it with depthcache extract "
                                  "--resume and the same --skip options")
        found.append((spec["layers"][0], ds, spec))
    if not found:
        flags = "" if sublayer == "layer" else f" --skip-sublayer {sublayer}"
        flags += "" if variant == "current" else f" --skip-variant {variant}"
        raise DepthcacheError(f"{store.location} has no {variant}-variant skip runs of the {sublayer}: make them with "
                              f"depthcache extract --out {store.location} --skip each{flags} (plus the baseline's "
                              "--model and --data)")
    return sorted(found, key=lambda f: f[0])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of float32 logits (..., vocab), the normaliser summed in float64."""
    top = logits.max(axis=-1, keepdims=True)
    total = np.exp(logits - top).sum(axis=-1, keepdims=True, dtype=np.float64)
    return (logits - top - np.log(total).astype(np.float32)).astype(np.float32)


def base_logprobs(h: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """Output log-probabilities (tokens, vocab) of a block of final residuals."""
    return log_softmax(logits_from_residual(h, head))


def output_block(h: np.ndarray, logp_base: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """(tokens, 3) per token: L2 distance of the probabilities, KL(base ‖ skip), top-1 changed (0/1)."""
    out = np.empty((len(h), 3), dtype=np.float64)
    for a in range(0, len(h), OUTPUT_SLICE):
        logp, base = base_logprobs(h[a:a + OUTPUT_SLICE], head), logp_base[a:a + OUTPUT_SLICE]
        p, pb = np.exp(logp), np.exp(base)
        out[a:a + OUTPUT_SLICE, 0] = np.sqrt(((p - pb) ** 2).sum(axis=-1, dtype=np.float64))
        out[a:a + OUTPUT_SLICE, 1] = (pb * (base - logp)).sum(axis=-1, dtype=np.float64)
        out[a:a + OUTPUT_SLICE, 2] = logp.argmax(axis=-1) != base.argmax(axis=-1)
    return out


def measured(base: xr.Dataset, run: xr.Dataset, tokens: slice, n: int, variant: str, include_first: bool) -> da.Array:
    """float64 weight per baseline token 0..n-1: 1 where a draw's effect is measured."""
    if variant == "future":
        stop, pos = run.skip_stop.data[tokens], base.position.data[:n]
        return ((stop > 0) & (pos >= stop)).astype(np.float64).rechunk(pos.chunks)
    return token_weights(base.isel(token=slice(0, n)), include_first)


def weighted_sum(x: da.Array, w: da.Array) -> da.Array:
    """Sum over the last (token) axis with weights, in float64 (NaNs where the weight is 0 ignored)."""
    return da.where(w > 0, x.astype(np.float64) * w, 0.0).sum(axis=-1)


def run_effects(base: xr.Dataset, base_d: da.Array, base_norm: da.Array, logp_base: da.Array, head: dict[str, Any],
                run: xr.Dataset, n: int, draws: int, variant: str, include_first: bool) -> dict[str, da.Array]:
    """Per-layer max/sum/count of the relative change and per-token output sums of one run, over its draws; and
    the same per window (``w_*``: (window, ...)) for the intervals."""
    index = [int(np.flatnonzero(base.layer.values == layer)[0]) for layer in run.layer.values]
    keys = ("max", "sum", "count", "out_max", "out_sum", "lp_sum", "lp_count", "w_max", "w_sum", "w_count", "w_out",
            "w_lp_sum", "w_lp_count")
    parts: dict[str, list[da.Array]] = {k: [] for k in keys}
    seq = base.seq_id.values[:n]
    for draw in range(draws):
        tokens = slice(draw * n, draw * n + n)
        w = measured(base, run, tokens, n, variant, include_first)
        d = (f32(run.attn_out.data[:, tokens]) + f32(run.mlp_out.data[:, tokens])).rechunk(base_d[index].chunks)
        rel = norm(d - base_d[index]) / da.maximum(base_norm[index], CLAMP)
        parts["max"].append(masked_max(rel, w))
        parts["sum"].append(weighted_sum(rel, w))
        parts["count"].append(w.sum())
        h = run.resid_final.data[tokens].rechunk(base.resid_final.data[:n].chunks)
        out = da.map_blocks(output_block, h, logp_base, head=head, dtype=np.float64,
                            chunks=(h.chunks[0], (3,)))
        parts["out_max"].append(masked_max(out.T, w))
        parts["out_sum"].append(weighted_sum(out.T, w))
        delta = run.next_logprob.data[tokens].rechunk(w.chunks) - base.next_logprob.data[:n]
        has = w * da.isfinite(delta)
        parts["lp_sum"].append(weighted_sum(delta, has))
        parts["lp_count"].append(has.sum())
        for key, (x, weight, how) in {"w_max": (rel, w, "max"), "w_sum": (rel, w, "sum"), "w_count": (w[None], w, "sum"),
                                      "w_out": (out.T, w, "sum"), "w_lp_sum": (delta[None], has, "sum"),
                                      "w_lp_count": (has[None], has, "sum")}.items():
            pieces, ids = token_pieces(x, weight, seq, how)
            parts[key].append(windows_of(pieces, ids, how))
    return {k: (da.stack(v).max(axis=0) if k.endswith("max") else da.stack(v).sum(axis=0)) for k, v in parts.items()}


def later_interval(maxima: np.ndarray, later: np.ndarray, n_resamples: int, seed: int, level: float) -> np.ndarray:
    """(2, skipped) interval of later_effect (the mean over later layers of the max over tokens) from per-window
    maxima (window, skipped, layer): the max over each resample's drawn windows, then the mean over l > s."""
    samples = max_replicates(maxima, n_resamples, seed)  # (resample, skipped, layer)
    with np.errstate(invalid="ignore", divide="ignore"):
        later_mean = np.where(later, samples, 0).sum(axis=-1) / np.where(later.any(axis=1), later.sum(axis=1), np.nan)
    return np.stack(percentile_interval(later_mean, level))


def padded_row(values: da.Array, before: int) -> da.Array:
    """A row over all stored layers: exact zeros for the ``before`` layers preceding the skipped one."""
    return da.concatenate([da.zeros(before, dtype=np.float64), values.astype(np.float64)]).rechunk(-1)


@analysis("skip-effects", "Effect of skipping each layer on every later layer's contribution and on the output "
          "(needs skip runs: extract --skip each).", plot=plot)
def skip_effects(store: Store, variant: str = "current", sublayer: str = "layer", include_first: bool = False,
                 max_tokens: Count | None = None, ci_resamples: Resamples = 1000, ci_seed: int = 0,
                 ci_level: Level = 0.95) -> xr.Dataset:
    """Skipped layer × layer relative change (max and mean over measured tokens) and per-skip output effects, over
    the first ``max_tokens`` baseline tokens the runs share (all by default); means and later_effect with
    percentile-bootstrap intervals over windows (``ci_*``)."""
    store.require("attn_out", "mlp_out", "resid_final")
    runs = skip_runs(store, variant, sublayer)
    n = min(min(spec["baseline_tokens"] for _, _, spec in runs), store.ds.sizes["token"], max_tokens or np.inf)
    base = store.ds
    base_d = f32(base.attn_out.data[:, :n]) + f32(base.mlp_out.data[:, :n])
    base_norm = norm(base_d)
    head = store.head
    logp_base = da.map_blocks(base_logprobs, base.resid_final.data[:n], head=head, dtype=np.float32,
                              chunks=(base.resid_final.data[:n].chunks[0], (head["unembed"].shape[0],)))
    layers = base.layer.values
    rows: dict[str, list[da.Array]] = {"max_effect": [], "mean_effect": [], "output": [], "output_mean": [],
                                       "logprob": [], "w_max": [], "w_sum": [], "w_count": [], "w_out": [],
                                       "w_lp_sum": [], "w_lp_count": []}
    for skipped, run, spec in runs:
        eff = run_effects(base, base_d, base_norm, logp_base, head, run, n, spec["draws"], variant, include_first)
        before = int((layers < skipped).sum())
        rows["max_effect"].append(padded_row(eff["max"], before))
        rows["mean_effect"].append(padded_row(eff["sum"] / eff["count"], before))
        rows["output"].append(eff["out_max"])
        rows["output_mean"].append(eff["out_sum"] / eff["count"])
        rows["logprob"].append(eff["lp_sum"] / eff["lp_count"])
        pad = da.zeros((eff["w_sum"].shape[0], before), dtype=np.float64)
        rows["w_max"].append(da.concatenate([pad, eff["w_max"]], axis=1).rechunk(-1))
        rows["w_sum"].append(da.concatenate([pad, eff["w_sum"]], axis=1).rechunk(-1))
        for key in ("w_count", "w_lp_sum", "w_lp_count"):
            rows[key].append(eff[key][:, 0])
        rows["w_out"].append(eff["w_out"])
    skipped_layers = np.array([s for s, _, _ in runs])
    max_effect = da.stack(rows["max_effect"])
    later = np.array([[layer > s for layer in layers] for s in skipped_layers])
    n_later = np.where(later.any(axis=1), later.sum(axis=1), np.nan)  # the last layer has no later layer: NaN
    output, output_mean = da.stack(rows["output"]), da.stack(rows["output_mean"])
    depth = store.n_layers
    w_max, w_sum, w_out = (da.stack(rows[k], axis=1) for k in ("w_max", "w_sum", "w_out"))  # (window, skipped, ...)
    w_count, w_lp_sum, w_lp_count = (da.stack(rows[k], axis=1) for k in ("w_count", "w_lp_sum", "w_lp_count"))
    ci = (ci_resamples, ci_seed, ci_level)
    effect_ci, out_ci, lp_ci = (lazy_interval(w_sum, w_count, *ci), lazy_interval(w_out, w_count, *ci),
                                lazy_interval(w_lp_sum, w_lp_count, *ci))
    later_ci = da.from_delayed(dask.delayed(later_interval, pure=True)(w_max, later, *ci),
                               shape=(2, len(skipped_layers)), dtype=np.float64)
    windows = np.unique(base.seq_id.values[:n])
    return xr.Dataset(
        {"max_effect": (("skipped_layer", "layer"), max_effect),
         "mean_effect": (("skipped_layer", "layer"), da.stack(rows["mean_effect"])),
         "later_effect": ("skipped_layer", da.where(later, max_effect, 0).sum(axis=1) / n_later),
         "output_l2_max": ("skipped_layer", output[:, 0]), "output_l2_mean": ("skipped_layer", output_mean[:, 0]),
         "output_kl_max": ("skipped_layer", output[:, 1]), "output_kl_mean": ("skipped_layer", output_mean[:, 1]),
         "top1_change": ("skipped_layer", output_mean[:, 2]),
         "logprob_change_mean": ("skipped_layer", da.stack(rows["logprob"])),
         "mean_effect_lo": (("skipped_layer", "layer"), effect_ci[0]),
         "mean_effect_hi": (("skipped_layer", "layer"), effect_ci[1]),
         "later_effect_lo": ("skipped_layer", later_ci[0]), "later_effect_hi": ("skipped_layer", later_ci[1]),
         "output_l2_mean_lo": ("skipped_layer", out_ci[0, :, 0]), "output_l2_mean_hi": ("skipped_layer", out_ci[1, :, 0]),
         "output_kl_mean_lo": ("skipped_layer", out_ci[0, :, 1]), "output_kl_mean_hi": ("skipped_layer", out_ci[1, :, 1]),
         "top1_change_lo": ("skipped_layer", out_ci[0, :, 2]), "top1_change_hi": ("skipped_layer", out_ci[1, :, 2]),
         "logprob_change_mean_lo": ("skipped_layer", lp_ci[0]), "logprob_change_mean_hi": ("skipped_layer", lp_ci[1]),
         "max_effect_by_window": (("window", "skipped_layer", "layer"), w_max),
         "effect_sum_by_window": (("window", "skipped_layer", "layer"), w_sum),
         "tokens_by_window": (("window", "skipped_layer"), w_count)},
        coords={"skipped_layer": skipped_layers, "layer": layers,
                "skipped_relative_depth": ("skipped_layer", skipped_layers / depth),
                "relative_depth": ("layer", layers / depth), "window": windows},
        attrs={"variant": variant, "sublayer": sublayer, "include_first": int(include_first), "tokens": n,
               "ci": f"{ci_level:g} percentile bootstrap over {len(windows)} windows, {ci_resamples} resamples, "
                     f"seed {ci_seed}",
               "draws": int(runs[0][2]["draws"]),
               "description": "max_effect/mean_effect[s, l]: max/mean over measured tokens of ‖d_l^skip − d_l^base‖ / "
                              "max(‖d_l^base‖, 1e-6), d_l = attn_out + mlp_out (0 for l < s by construction); "
                              "later_effect[s]: mean of max_effect over l > s; output_*: over measured tokens, "
                              "probabilities from resid_final and the store's head (L2 distance, KL(base ‖ skip)); "
                              "top1_change: fraction of measured tokens whose top-1 prediction changes; "
                              "logprob_change_mean: mean (skip − base) log-prob of the actual next token; *_lo/*_hi: "
                              "percentile-bootstrap interval over windows (attr ci; later_effect's from each "
                              "resample's max over its windows); *_by_window: each window's max and sum of the "
                              "relative change and its measured tokens"})
