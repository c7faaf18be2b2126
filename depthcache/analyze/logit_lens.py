"""logit-lens: what each layer's residual would predict through the final norm and unembedding (docs/analyses.md).

For every stored layer's input h_l and the final residual h_L, per token: KL(lens_l ‖ final), whether the top-1
tokens agree, and the overlap |top5_l ∩ top5_final| / 5, where the final distribution is the lens of h_L (the
model's output). Means over tokens in float64. Logits are formed for LENS_TOKENS tokens at a time inside each chunk,
so memory stays at a few (LENS_TOKENS × vocab) float32 arrays per thread whatever the store size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.registry import Count, analysis
from depthcache.store.head import logits_from_residual
from depthcache.store.reader import Store

LENS_TOKENS = 128
TOP = 5
STATS = ("count", "kl", "top1", "top5")


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Log-probabilities of float32 logits (tokens, vocab); the normaliser's sum is pairwise in float32."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_ids(z: np.ndarray, k: int) -> np.ndarray:
    """(tokens, k) ids of the k largest logits per token (unordered)."""
    return np.argpartition(z, -k, axis=-1)[:, -k:]


def compare(z: np.ndarray, logp_final: np.ndarray, top1_final: np.ndarray, top5_final: np.ndarray) -> np.ndarray:
    """(3, tokens) float64 KL(lens ‖ final), top-1 agreement (0/1), top-5 overlap of lens logits ``z``."""
    logp = log_softmax(z)
    kl = (np.exp(logp) * (logp - logp_final)).sum(axis=-1)
    fifth = np.partition(z, -TOP, axis=-1)[:, -TOP]  # lens top-5 = logits ≥ the 5th largest (ties aside)
    overlap = (np.take_along_axis(z, top5_final, axis=-1) >= fifth[:, None]).sum(axis=-1) / TOP
    return np.stack([kl, z.argmax(axis=-1) == top1_final, np.minimum(overlap, 1.0)]).astype(np.float64)


def chunk_sums(h: np.ndarray, final: np.ndarray, position: np.ndarray, head: dict[str, Any], *,
               include_first: bool) -> np.ndarray:
    """(1, len(STATS), layer + 1) token count and sums of KL, top-1 and top-5 agreement over one token chunk."""
    keep = position >= (0 if include_first else 1)
    out = np.zeros((1, len(STATS), h.shape[0] + 1))
    for a in np.arange(0, len(position), LENS_TOKENS):
        rows = np.flatnonzero(keep[a:a + LENS_TOKENS]) + a
        if not len(rows):
            continue
        z_final = logits_from_residual(final[rows], head)
        logp_final, top1, top5 = log_softmax(z_final), z_final.argmax(axis=-1), top_ids(z_final, TOP)
        out[0, 0] += len(rows)
        for layer in range(h.shape[0]):
            out[0, 1:, layer] += compare(logits_from_residual(h[layer, rows], head), logp_final, top1, top5).sum(1)
        out[0, 1:, -1] += compare(z_final, logp_final, top1, top5).sum(axis=1)
    return out


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """KL to the output and top-1/top-5 agreement per layer."""
    layers, depth = result.layer.values, int(result.attrs["n_layers"])
    fig, (kl, agree) = plotting.figure(2)
    kl.plot(layers, result.kl_mean, marker="o", ms=3, color="tab:purple")
    kl.set(ylabel="mean KL(lens ‖ output) [nats]", title="Logit lens: divergence from the output")
    agree.plot(layers, result.top1_agreement, marker="o", ms=3, label="top-1 agreement")
    agree.plot(layers, result.top5_overlap, marker="s", ms=3, label="top-5 overlap")
    agree.set(ylabel="fraction (mean over tokens)", ylim=(-0.02, 1.02), title="Logit lens: agreement with the output")
    plotting.legend_outside(agree)
    for ax in (kl, agree):
        ax.set_xlabel(f"layer (input of layer l; {depth} = final residual)")
        plotting.layer_axis(ax)
        ax.secondary_xaxis("top", functions=(lambda x: x / depth, lambda x: x * depth)).set_xlabel(
            "relative depth l / L")
    first = "included" if result.attrs["include_first"] else "excluded"
    fig.suptitle(plotting.model_title(result.attrs, f"Logit lens ({int(result.tokens_used)} tokens, position 0 "
                                                    f"{first})"), fontsize=9)
    return [plotting.save(fig, folder, "logit-lens")]


@analysis("logit-lens", "Final norm + unembedding applied to every layer's residual: KL to the output, top-1 "
          "agreement and top-5 overlap per layer.", plot=plot)
def logit_lens(store: Store, include_first: bool = False, max_tokens: Count | None = None) -> xr.Dataset:
    """Per layer (and the final residual, layer L): mean KL(lens ‖ final), top-1 agreement, top-5 overlap, over
    the first ``max_tokens`` tokens (all by default)."""
    store.require("resid_pre", "resid_final")
    ds = store.ds if max_tokens is None else store.ds.isel(token=slice(0, int(max_tokens)))
    head = dask.delayed(store.head, pure=True)  # one graph key: shipped once to each distributed worker
    sums = da.blockwise(chunk_sums, "tsl", ds.resid_pre.data, "ltd", ds.resid_final.data, "td", ds.position.data,
                        "t", head, None, new_axes={"s": len(STATS), "l": ds.sizes["layer"] + 1},
                        adjust_chunks={"t": 1}, concatenate=True, dtype=np.float64, meta=np.empty((0, 0, 0)),
                        include_first=include_first).sum(axis=0)
    means = sums[1:] / sums[0]
    layers = np.append(ds.layer.values, store.n_layers)
    return xr.Dataset(
        {"kl_mean": ("layer", means[0]), "top1_agreement": ("layer", means[1]), "top5_overlap": ("layer", means[2]),
         "tokens_used": ((), sums[0, 0])},
        coords={"layer": layers, "relative_depth": ("layer", layers / store.n_layers)},
        attrs={"include_first": int(include_first), "n_layers": store.n_layers, "tokens": int(ds.sizes["token"]),
               "description": "lens_l = softmax(head(h_l)), head = the model's final norm, unembedding, logit "
                              "scale and soft-cap; layer L = the final residual (the "
                              "output). Per token: KL(lens_l ‖ output) in nats, top-1 agreement, |top5_l ∩ "
                              "top5_output| / 5; means over tokens (float64); position 0 of each window "
                              f"{'included' if include_first else 'excluded'} (parameter include_first)"})
