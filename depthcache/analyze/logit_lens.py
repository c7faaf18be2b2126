"""logit-lens: what each layer's residual would predict through the final norm and unembedding (docs/analyses.md).

For every stored layer's input h_l and the final residual h_L, per token: KL(lens_l ‖ final), whether the top-1
tokens agree, and the overlap |top5_l ∩ top5_final| / 5, where the final distribution is the lens of h_L (the
model's output). Means over tokens in float64. Logits are formed for LENS_TOKENS tokens at a time inside each chunk,
so memory stays at a few (LENS_TOKENS × vocab) float32 arrays per thread whatever the store size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.layer_subset import select_layers
from depthcache.analyze.reduce import lazy_interval, run_starts, scratch, window_pieces, windows_of
from depthcache.analyze.registry import Count, Level, Resamples, analysis
from depthcache.store.head import apply_final_norm, output_transform
from depthcache.store.reader import Store

LENS_TOKENS = 128
ROWS = 8  # logit rows per in-cache pass of the exponential and the KL product
TOP = 5
STATS = ("count", "kl", "top1", "top5")


BLOCKS = 64  # vocabulary blocks whose maxima bound each row's top-5 threshold from below


def lens_logits(h: np.ndarray, head: dict[str, Any], key: str) -> np.ndarray:
    """``logits_from_residual`` written into the per-thread buffer ``key``: the same product, bias, logit scale and
    soft-cap, in place, without fresh pages for every (tokens × vocab) result."""
    normed = apply_final_norm(h, head)
    return output_transform(np.matmul(normed, head["unembed"].T,
                                      out=scratch(key, (len(normed), head["unembed"].shape[0]))), head)


def softmax_terms(z: np.ndarray, maxima: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float32 logits (tokens, vocab) and their ``block_maxima``: the max m and the float32 sum of
    exp(z - m)."""
    m = maxima.max(axis=1)
    total = np.empty(len(z), np.float32)
    for rows, e in row_blocks(z, m):
        total[rows] = e.sum(axis=1)
    return m, total


def row_blocks(z: np.ndarray, m: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """exp(z - m) for ROWS rows at a time, in a reused per-thread buffer: every pass over those rows (the
    exponential, its sum, the KL product) then runs on data in cache instead of streaming (tokens × vocab) arrays
    through memory once per pass."""
    buffer = scratch("lens_e", (ROWS, z.shape[1]))
    for a in range(0, len(z), ROWS):
        rows = slice(a, min(a + ROWS, len(z)))
        e = np.subtract(z[rows], m[rows, None], out=buffer[:rows.stop - a])
        yield rows, np.exp(e, out=e)


def block_maxima(z: np.ndarray) -> np.ndarray:
    """(tokens, blocks) maxima of about BLOCKS equal slices of each row (the last slice takes the remainder)."""
    width = max(1, z.shape[1] // BLOCKS)
    n = z.shape[1] // width
    head = z[:, :n * width].reshape(z.shape[0], n, width).max(axis=2)
    return head if n * width == z.shape[1] else np.concatenate([head, z[:, n * width:].max(axis=1)[:, None]], 1)


def top_of_rows(z: np.ndarray, k: int, maxima: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the index of the first maximum (as argmax) and the k-th largest value (as np.partition), found among
    the entries at or above the k-th largest block maximum (``maxima``: ``block_maxima(z)`` when already known):
    only the few blocks whose maximum reaches that bound are searched."""
    t, vocab = z.shape
    width = max(1, vocab // BLOCKS)
    n = vocab // width
    maxima = block_maxima(z) if maxima is None else maxima
    bound = np.partition(maxima, -k, axis=1)[:, -k] if maxima.shape[1] >= k else maxima.min(axis=1)
    block_rows, blocks = np.nonzero(maxima[:, :n] >= bound[:, None])
    picked = z[:, :n * width].reshape(t, n, width)[block_rows, blocks]
    sub_rows, sub_cols = np.nonzero(picked >= bound[block_rows, None])
    rows, cols = block_rows[sub_rows], blocks[sub_rows] * width + sub_cols
    if n * width < vocab:  # the remainder columns, searched whole
        tail_rows, tail_cols = np.nonzero(z[:, n * width:] >= bound[:, None])
        rows, cols = np.concatenate([rows, tail_rows]), np.concatenate([cols, tail_cols + n * width])
    in_order = np.lexsort((cols, rows))
    rows, cols = rows[in_order], cols[in_order]
    values = z[rows, cols]
    by_value = np.lexsort((-values, rows))  # by row, then value descending
    starts = np.searchsorted(rows, np.arange(t))
    kth = values[by_value][starts + k - 1]
    first = np.flatnonzero(values == maxima.max(axis=1)[rows])
    argmax = cols[first[np.searchsorted(rows[first], np.arange(t))]]
    return argmax, kth


def compare(z: np.ndarray, z_final: np.ndarray, lse_final: np.ndarray, top1_final: np.ndarray,
            top5_final: np.ndarray) -> np.ndarray:
    """(3, tokens) float64 KL(lens ‖ final), top-1 agreement (0/1), top-5 overlap of lens logits ``z``.

    KL = Σ p (log p − log q) = Σ p (z − z_final) − lse(z) + lse(z_final), with p = exp(z − m) / Σ exp(z − m): one
    exponential pass and one product pass over the vocabulary instead of two log-softmaxes, both on ROWS rows at a
    time while they are in cache."""
    maxima = block_maxima(z)
    m = maxima.max(axis=1)
    total, cross = np.empty(len(z), np.float32), np.empty(len(z), np.float32)
    difference = scratch("lens_d", (ROWS, z.shape[1]))
    for rows, e in row_blocks(z, m):
        total[rows] = e.sum(axis=1)
        cross[rows] = np.vecdot(e, np.subtract(z[rows], z_final[rows], out=difference[:len(e)]))
    lse = m.astype(np.float64) + np.log(total.astype(np.float64))
    kl = cross.astype(np.float64) / total - lse + lse_final
    argmax, fifth = top_of_rows(z, TOP, maxima)
    overlap = (np.take_along_axis(z, top5_final, axis=-1) >= fifth[:, None]).sum(axis=-1) / TOP
    return np.stack([kl, argmax == top1_final, np.minimum(overlap, 1.0)]).astype(np.float64)


def chunk_sums(h: np.ndarray, final: np.ndarray, position: np.ndarray, seq: np.ndarray, head: dict[str, Any], *,
               include_first: bool) -> np.ndarray:
    """(pieces, len(STATS), layer + 1) token count and sums of KL, top-1 and top-5 agreement over each window piece
    (a run of one seq_id) of one token chunk: the per-window partial sums the intervals resample.

    The output compared with itself (layer L) is KL 0, top-1 1 and top-5 1 exactly, so it is counted, not
    computed."""
    keep = position >= (0 if include_first else 1)
    piece = np.cumsum(np.isin(np.arange(len(seq)), run_starts(seq))) - 1
    out = np.zeros((int(piece[-1]) + 1 if len(piece) else 0, len(STATS), h.shape[0] + 1))
    for a in np.arange(0, len(position), LENS_TOKENS):
        rows = np.flatnonzero(keep[a:a + LENS_TOKENS]) + a
        if not len(rows):
            continue
        z_final = lens_logits(final[rows], head, "lens_final")
        maxima = block_maxima(z_final)
        m, total = softmax_terms(z_final, maxima)
        lse_final = m.astype(np.float64) + np.log(total.astype(np.float64))
        top1 = top_of_rows(z_final, 1, maxima)[0]
        top5 = np.argpartition(z_final, -TOP, axis=-1)[:, -TOP:]
        where, n = piece[rows], len(out)
        counted = np.bincount(where, minlength=n).astype(np.float64)
        out[:, 0] += counted[:, None]
        for layer in range(h.shape[0]):
            z = lens_logits(h[layer, rows], head, "lens_z")
            values = compare(z, z_final, lse_final, top1, top5)
            for k in range(len(values)):
                out[:, 1 + k, layer] += np.bincount(where, weights=values[k], minlength=n)
        out[:, 2:, -1] += counted[:, None]  # top-1 and top-5 of the output against itself; its KL stays 0
    return out


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """KL to the output and top-1/top-5 agreement per layer."""
    layers, depth = result.layer.values, int(result.attrs["n_layers"])
    fig, (kl, agree) = plotting.figure(2)
    kl.plot(layers, result.kl_mean, marker="o", ms=3, color="tab:purple")
    plotting.interval_band(kl, result, "kl_mean", "tab:purple")
    kl.set(ylabel="mean KL(lens ‖ output) [nats]", title="Logit lens: divergence from the output")
    for name, marker, label in (("top1_agreement", "o", "top-1 agreement"), ("top5_overlap", "s", "top-5 overlap")):
        line, = agree.plot(layers, result[name], marker=marker, ms=3, label=label)
        plotting.interval_band(agree, result, name, line.get_color())
    agree.set(ylabel="fraction (mean over tokens)", ylim=(-0.02, 1.02), title="Logit lens: agreement with the output")
    plotting.legend_outside(agree)
    for ax in (kl, agree):
        ax.set_xlabel(f"layer (input of layer l; {depth} = final residual)")
        plotting.layer_axis(ax)
        ax.secondary_xaxis("top", functions=(lambda x: x / depth, lambda x: x * depth)).set_xlabel(
            "relative depth l / L")
    first = "included" if result.attrs["include_first"] else "excluded"
    fig.suptitle(plotting.model_title(result.attrs, f"Logit lens ({int(result.tokens_used)} tokens, position 0 "
                                                    f"{first}{plotting.band_note(result)})"), fontsize=9)
    return [plotting.save(fig, folder, "logit-lens")]


@analysis("logit-lens", "Final norm + unembedding applied to every layer's residual: KL to the output, top-1 "
          "agreement and top-5 overlap per layer.", plot=plot)
def logit_lens(store: Store, include_first: bool = False, max_tokens: Count | None = None,
               layers: str = "all", ci_resamples: Resamples = 1000, ci_seed: int = 0,
               ci_level: Level = 0.95) -> xr.Dataset:
    """Per layer of ``layers`` (a layer spec; the final residual, layer L, always): mean KL(lens ‖ final), top-1
    agreement, top-5 overlap, over the first ``max_tokens`` tokens (all by default), with percentile-bootstrap
    intervals over windows (``ci_*``)."""
    store.require("resid_pre", "resid_final")
    ds = select_layers(store.ds, layers, store.n_layers)
    ds = ds if max_tokens is None else ds.isel(token=slice(0, int(max_tokens)))
    head = dask.delayed(store.head, pure=True)  # one graph key: shipped once to each distributed worker
    resid = ds.resid_pre.data.rechunk({0: -1})  # every lens row of a token block in one task (2.0 splits layers)
    tokens = resid.chunks[1]
    sizes, piece_ids = window_pieces(ds.seq_id.values, tokens)
    pieces = da.blockwise(chunk_sums, "tsl", resid, "ltd", ds.resid_final.data.rechunk({0: tokens}), "td",
                          ds.position.data.rechunk((tokens,)), "t", ds.seq_id.data.rechunk((tokens,)), "t", head, None,
                          new_axes={"s": len(STATS), "l": ds.sizes["layer"] + 1}, adjust_chunks={"t": sizes},
                          concatenate=True, dtype=np.float64, meta=np.empty((0, 0, 0)), include_first=include_first)
    sums = pieces.sum(axis=0)
    means = sums[1:] / sums[0]
    by_window = windows_of(pieces, piece_ids)  # (window, stat, layer)
    lo, hi = lazy_interval(by_window[:, 1:], by_window[:, 0, 0], ci_resamples, ci_seed, ci_level)
    layers = np.append(ds.layer.values, store.n_layers)
    return xr.Dataset(
        {"kl_mean": ("layer", means[0]), "top1_agreement": ("layer", means[1]), "top5_overlap": ("layer", means[2]),
         "kl_mean_lo": ("layer", lo[0]), "kl_mean_hi": ("layer", hi[0]),
         "top1_agreement_lo": ("layer", lo[1]), "top1_agreement_hi": ("layer", hi[1]),
         "top5_overlap_lo": ("layer", lo[2]), "top5_overlap_hi": ("layer", hi[2]),
         "sum_by_window": (("window", "stat", "layer"), by_window[:, 1:]),
         "tokens_by_window": ("window", by_window[:, 0, 0]),
         "tokens_used": ((), sums[0, 0])},
        coords={"layer": layers, "relative_depth": ("layer", layers / store.n_layers),
                "window": np.unique(piece_ids), "stat": np.array(STATS[1:], dtype=object)},
        attrs={"include_first": int(include_first), "n_layers": store.n_layers, "tokens": int(ds.sizes["token"]),
               "ci": f"{ci_level:g} percentile bootstrap over {len(np.unique(piece_ids))} windows, {ci_resamples} "
                     f"resamples, seed {ci_seed}",
               "description": "lens_l = softmax(head(h_l)), head = the model's final norm, unembedding, logit "
                              "scale and soft-cap; layer L = the final residual (the "
                              "output). Per token: KL(lens_l ‖ output) in nats, top-1 agreement, |top5_l ∩ "
                              "top5_output| / 5; means over tokens (float64); position 0 of each window "
                              f"{'included' if include_first else 'excluded'} (parameter include_first); "
                              "*_lo/*_hi: percentile-bootstrap interval of each mean over windows (attr ci); "
                              "sum_by_window / tokens_by_window: each window's sums of kl, top1, top5 and its "
                              "tokens"})
