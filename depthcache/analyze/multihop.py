"""multihop: does the depth at which the answer forms grow with the number of hops? (docs/analyses.md)

On a task store (``extract --data task:...``, schema 1.2), per item:
- logit lens at the position predicting the answer's FIRST token: the rank (number of vocabulary tokens with a
  strictly larger logit) and probability of that token when the stored final norm and unembedding are applied to
  each stored layer's input ``resid_pre[l]`` and to ``resid_final`` (layer L); the formation layer is the first
  layer where the rank is 0 (top-1), NaN if it never is;
- with current-variant single-layer skip runs (``extract --skip each``): the effect of skipping layer s at ALL
  positions predicting answer tokens (the first one included): ``effect_logprob`` = mean over those positions of
  |log p_skip − log p_base| of the gold next token (the stored exact ``next_logprob``), ``effect_l2`` = mean of
  ‖p_skip − p_base‖₂ (softmax of ``resid_final`` through the stored head); the depth score is the centre of mass
  of the effect over skipped layers, Σ_s (s/L)·e_s / Σ_s e_s, as relative depth;
- correctness: the stored top-1 equals the gold token at every answer position; for items with ``meta.hop_ids``
  (two-hop-facts) whether each single-hop item is correct too.
Summaries per hop count (mean, population std, count) use the included items: with ``only_correct_hops``
(default: True when the task has hop_ids) composed items count only when all their single hops are answered
correctly; with ``only_correct`` only items the model itself answers correctly.
Memory: the lens gathers (stored layers + 1) × items × d_model float32 and forms LENS_ROWS × vocab logits at a
time; the skip part gathers runs × answer positions × d_model.
The paper's depth score is another measure (docs/analyses.md, "Ours and the paper's"): its intervention skips only
the prompt's positions, which no stored run does, so ``depthcache hop-depth`` (locate/hops.py) runs it from the model;
its per-hop reduction is ``paper_depth`` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.reduce import f32
from depthcache.analyze.registry import analysis
from depthcache.analyze.skip_effects import skip_runs
from depthcache.errors import DepthcacheError
from depthcache.store.head import logits_from_residual
from depthcache.store.reader import Store

LENS_ROWS = 128


def logits_lse(h: np.ndarray, head: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits (rows, vocab) of residuals (rows, d) and their log-sum-exp (exponentials summed in float64)."""
    z = logits_from_residual(h, head)
    top = z.max(axis=-1, keepdims=True)
    return z, top[:, 0].astype(np.float64) + np.log(np.exp(z - top).sum(axis=-1, dtype=np.float64))


def gold_stats(h: np.ndarray, gold: np.ndarray, head: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of residuals (rows, d): rank (tokens with a strictly larger logit) and log-prob of the ``gold`` token."""
    z, lse = logits_lse(h, head)
    zg = z[np.arange(len(gold)), gold]
    return (z > zg[:, None]).sum(axis=-1), zg - lse


def probabilities(h: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """Softmax (rows, vocab) of the residuals' logits, float32."""
    z, lse = logits_lse(h, head)
    return np.exp(z - lse[:, None].astype(np.float32))


def lens(h: np.ndarray, gold: np.ndarray, head: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(layers, rows) rank and probability of ``gold`` under the lens of every layer of ``h`` (layers, rows, d)."""
    rank = np.zeros(h.shape[:2], dtype=np.int64)
    prob = np.zeros(h.shape[:2], dtype=np.float64)
    for layer in range(h.shape[0]):
        for a in range(0, h.shape[1], LENS_ROWS):
            r, lp = gold_stats(h[layer, a:a + LENS_ROWS], gold[a:a + LENS_ROWS], head)
            rank[layer, a:a + LENS_ROWS], prob[layer, a:a + LENS_ROWS] = r, np.exp(lp)
    return rank, prob


def first_top1(rank: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Per column of ``rank`` (layers, items): the first layer with rank 0, NaN where there is none."""
    hit = rank == 0
    return np.where(hit.any(axis=0), layers[hit.argmax(axis=0)].astype(np.float64), np.nan)


def per_item_mean(values: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Mean of ``values`` over each item's rows (NaN if any row of the item is NaN)."""
    sums = np.bincount(item, weights=values, minlength=n_items)
    return sums / np.bincount(item, minlength=n_items)


def output_l2(h_run: np.ndarray, h_base: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    """(runs, rows) ‖softmax − softmax_base‖₂ of each run's final residuals against the baseline's, in blocks."""
    out = np.zeros(h_run.shape[:2])
    for a in range(0, h_base.shape[0], LENS_ROWS):
        rows = slice(a, a + LENS_ROWS)
        p_base = probabilities(h_base[rows], head)
        for r in range(h_run.shape[0]):
            out[r, rows] = np.sqrt(((probabilities(h_run[r, rows], head) - p_base) ** 2).sum(axis=-1, dtype=np.float64))
    return out


def centre_of_mass(effect: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Σ depth·e / Σ e over the last axis (NaN where an effect is missing or all are zero)."""
    total = effect.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (effect * depth).sum(axis=-1) / total, np.nan)


def later_layer_profile(effect: np.ndarray) -> np.ndarray:
    """(..., skipped s, layer l) → (..., s): the paper's effect of skipping s on the later layers,
    Σ_l effect[s, l] / max(L − 1 − s, 1) (entries l ≤ s are zero when only earlier positions are skipped), float64."""
    return effect.sum(axis=-1, dtype=np.float64) / np.maximum(effect.shape[-1] - 1 - np.arange(effect.shape[-2]), 1)


def paper_depth(layer_effect: np.ndarray, output_l2: np.ndarray, hops: np.ndarray) -> dict[str, Any]:
    """The paper's multi-hop reduction of per-item skip effects (``layer_effect`` (item, s, l), ``output_l2``
    (item, s)): per hop count, the elementwise max over its items (the paper's; the mean beside it), the later-layer
    profile of the max (or mean) layer effect and the output profile, and each profile's depth score
    Σ_s (s/L) e_s / Σ_s e_s. Returns xarray variables with dims hops (and skipped_layer)."""
    groups = np.unique(hops)
    depth = np.arange(layer_effect.shape[1]) / layer_effect.shape[-1]
    out: dict[str, Any] = {"n_items": ("hops", np.array([(hops == g).sum() for g in groups]))}
    for stat, reduce in (("max", np.max), ("mean", np.mean)):
        later = later_layer_profile(np.stack([reduce(layer_effect[hops == g], axis=0) for g in groups]))
        output = np.stack([reduce(output_l2[hops == g], axis=0) for g in groups]).astype(np.float64)
        out |= {f"later_effect_{stat}": (("hops", "skipped_layer"), later),
                f"output_l2_{stat}": (("hops", "skipped_layer"), output),
                f"depth_score_later_{stat}": ("hops", centre_of_mass(later, depth)),
                f"depth_score_output_{stat}": ("hops", centre_of_mass(output, depth))}
    return out


def skip_part(store: Store, pos: np.ndarray, item: np.ndarray, n_items: int, base_lp: np.ndarray,
              base_final: np.ndarray) -> dict[str, Any]:
    """Per-item skip-effect profiles and depth scores from the store's current-variant single-layer skip runs."""
    runs = skip_runs(store, "current", "layer")
    covered = [pos < spec["baseline_tokens"] for _, _, spec in runs]
    safe = [np.where(c, pos, 0) for c in covered]
    gathered = dask.compute(*[(run.next_logprob.data[s], f32(run.resid_final.data[s]))
                              for (_, run, _), s in zip(runs, safe)])
    lp = np.stack([np.where(c, g[0], np.nan) for c, g in zip(covered, gathered)])
    l2 = output_l2(np.stack([g[1] for g in gathered]), base_final, store.head)
    l2[~np.stack(covered)] = np.nan
    layers = np.array([s for s, _, _ in runs])
    depth = layers / store.n_layers
    e_lp = np.stack([per_item_mean(np.abs(row - base_lp), item, n_items) for row in lp], axis=1)
    e_l2 = np.stack([per_item_mean(row, item, n_items) for row in l2], axis=1)
    return {"skipped_layer": layers, "skipped_depth": depth, "effect_logprob": e_lp, "effect_l2": e_l2,
            "depth_score": centre_of_mass(e_lp, depth), "depth_score_l2": centre_of_mass(e_l2, depth)}


def hop_correctness(items: list[dict[str, Any]], correct: np.ndarray) -> np.ndarray:
    """Per item: every single-hop item named in ``meta.hop_ids`` is in the store and answered correctly (True
    for items without hop_ids)."""
    index = {it["id"]: i for i, it in enumerate(items)}
    hop_ids = [it.get("meta", {}).get("hop_ids") or [] for it in items]
    return np.array([all(h in index and correct[index[h]] for h in ids) for ids in hop_ids], dtype=bool)


def group_stats(values: np.ndarray, hops: np.ndarray, keep: np.ndarray, groups: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, population std and count of the finite ``values`` of kept items, per hop count in ``groups``."""
    out = np.full((3, len(groups)), np.nan)
    for g, h in enumerate(groups):
        v = values[keep & (hops == h) & np.isfinite(values)]
        out[:, g] = (v.mean(), v.std(), len(v)) if len(v) else (np.nan, np.nan, 0)
    return out[0], out[1], out[2]


def require_task_store(store: Store) -> list[dict[str, Any]]:
    """The items of a complete task store, or a clear error."""
    if "answer_index" not in store.ds or "items" not in store.attrs["dataset"]:
        raise DepthcacheError(f"{store.location} is not a task store: extract one with --data task:NAME "
                              "(e.g. depthcache extract --data task:two-hop-facts --out runs/hops.zarr)")
    if not store.attrs["progress"]["complete"]:
        raise DepthcacheError(f"{store.location} is incomplete: finish it with depthcache extract --resume")
    store.require("resid_pre", "resid_final")
    return store.attrs["dataset"]["items"]


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """Depth score and answer-formation depth vs number of hops: items (dots) and mean ± std per hop count."""
    fig, axes = plotting.figure(2, width=4.8, height=3.8)
    keep = result.included.values.astype(bool)
    hops = result.item_hops.values
    rng = np.random.default_rng(0)
    panels = (("depth_score", "depth score: centre of mass of the\nskip effect on answer log-probs (l / L)"),
              ("formation_depth", "first layer where the lens ranks the\nanswer's first token top-1 (l / L)"))
    for ax, (name, label) in zip(axes, panels):
        if name not in result:
            ax.text(0.5, 0.5, "no skip runs in the store\n(extract --skip each)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set(xlabel="hops", ylabel=label)
            continue
        values = result[name].values
        x = hops + rng.uniform(-0.12, 0.12, len(hops))
        ax.scatter(x[keep], values[keep], s=9, alpha=0.45, color="tab:blue", label="items")
        ax.errorbar(result.hops.values, result[f"{name}_mean"].values, yerr=result[f"{name}_std"].values,
                    fmt="o-", color="black", capsize=4, label="mean ± std")
        for h, n in zip(result.hops.values, result[f"{name}_count"].values):
            ax.annotate(f"n={int(n)}", (h, 1.02), ha="center", fontsize=7, xycoords=("data", "axes fraction"))
        ax.set(xlabel="hops", ylabel=label, ylim=(-0.02, 1.05), xticks=result.hops.values)
    if axes[-1].get_legend_handles_labels()[0]:
        plotting.legend_outside(axes[-1])
    which = ("composed items with correct single hops" if result.attrs["only_correct_hops"] else "all items") + \
        (", correct answers only" if result.attrs["only_correct"] else "")
    fig.suptitle(plotting.model_title(result.attrs, f"Multi-hop depth ({which})"), fontsize=9)
    return [plotting.save(fig, folder, "multihop")]


@analysis("multihop", "Per item of a task store: logit-lens answer-formation layer and skip-effect depth score at "
          "the answer positions, grouped by number of hops.", plot=plot)
def multihop(store: Store, only_correct_hops: bool | None = None, only_correct: bool = False) -> xr.Dataset:
    """Per-item answer formation (logit lens) and skip-effect depth score, with mean/std/count per hop count."""
    items = require_task_store(store)
    ds = store.ds
    answer_index, item_of = dask.compute(ds.answer_index.data, ds.item.data)
    pos = np.flatnonzero(answer_index >= 0)
    item, first = item_of[pos], np.flatnonzero(answer_index == 0)
    n_items, depth = len(items), store.n_layers
    gold, base_lp, top1, h, final = dask.compute(
        ds.next_token_id.data[pos], ds.next_logprob.data[pos], ds.topk_ids.data[pos, 0],
        f32(ds.resid_pre.data[:, first]), f32(ds.resid_final.data[pos]))
    if len(first) != n_items or not np.array_equal(item_of[first], np.arange(n_items)):
        raise DepthcacheError(f"{store.location}: the answer positions do not match the {n_items} items of its "
                              "attributes; the store is damaged (depthcache validate STORE)")
    first_in_pos = np.searchsorted(pos, first)
    rank, prob = lens(np.concatenate([h, final[None, first_in_pos]]), gold[first_in_pos], store.head)
    layers = np.append(ds.layer.values, depth)
    correct = np.bincount(item, weights=top1 != gold, minlength=n_items) == 0
    hops = np.array([it["hops"] for it in items])
    hops_ok = hop_correctness(items, correct)
    use_hops = any(it.get("meta", {}).get("hop_ids") for it in items) if only_correct_hops is None \
        else bool(only_correct_hops)
    included = (hops_ok if use_hops else np.ones(n_items, bool)) & (correct if only_correct else True)
    formation = first_top1(rank, layers)
    per_item: dict[str, Any] = {"formation_depth": formation / depth}
    extra: dict[str, Any] = {}
    coords: dict[str, Any] = {}
    if store.runs():
        skip = skip_part(store, pos, item, n_items, base_lp, final)
        per_item |= {"depth_score": skip["depth_score"], "depth_score_l2": skip["depth_score_l2"]}
        extra = {"effect_logprob": (("item", "skipped_layer"), skip["effect_logprob"]),
                 "effect_l2": (("item", "skipped_layer"), skip["effect_l2"])}
        coords = {"skipped_layer": skip["skipped_layer"],
                  "skipped_relative_depth": ("skipped_layer", skip["skipped_depth"])}
    groups = np.unique(hops)
    summary = {}
    for name, values in per_item.items():
        mean, std, count = group_stats(values, hops, included, groups)
        summary |= {f"{name}_mean": ("hops", mean), f"{name}_std": ("hops", std), f"{name}_count": ("hops", count)}
    if "effect_logprob" in extra:
        for name in ("effect_logprob", "effect_l2"):
            values = extra[name][1]
            summary[f"profile_{name.removeprefix('effect_')}"] = (
                ("hops", "skipped_layer"),
                np.stack([np.nanmean(values[included & (hops == g)], axis=0) if (included & (hops == g)).any()
                          else np.full(values.shape[1], np.nan) for g in groups]))
    return xr.Dataset(
        {"item_hops": ("item", hops.astype(np.int32)), "correct": ("item", correct),
         "hops_correct": ("item", hops_ok), "included": ("item", included),
         "answer_logprob": ("item", np.bincount(item, weights=base_lp, minlength=n_items)),
         "n_answer_tokens": ("item", np.bincount(item, minlength=n_items).astype(np.int32)),
         "answer_rank": (("item", "layer"), rank.T), "answer_prob": (("item", "layer"), prob.T),
         "formation_layer": ("item", formation),
         **{name: ("item", values) for name, values in per_item.items()}, **extra, **summary,
         "n_items": ("hops", np.array([(hops == g).sum() for g in groups])),
         "n_correct": ("hops", np.array([(correct & (hops == g)).sum() for g in groups])),
         "n_included": ("hops", np.array([(included & (hops == g)).sum() for g in groups]))},
        coords={"item": np.array([it["id"] for it in items], dtype=object), "layer": layers,
                "relative_depth": ("layer", layers / depth), "hops": groups, **coords},
        attrs={"only_correct_hops": int(use_hops), "only_correct": int(only_correct), "n_layers": depth,
               "task": store.attrs["dataset"]["task"]["name"],
               "description": "answer_rank/answer_prob[item, layer]: logit lens (stored final norm + unembedding) "
                              "of resid_pre[layer] (layer L: resid_final) at the position predicting the answer's "
                              "first token; formation_layer: first layer with rank 0 (NaN: never); "
                              "effect_logprob/effect_l2[item, s]: mean over ALL positions predicting answer tokens "
                              "of |Δ log p(gold)| / ‖Δp‖₂ when layer s is skipped (current variant); depth_score"
                              "(_l2): centre of mass Σ (s/L) e_s / Σ e_s; *_mean/_std/_count per hop count over "
                              "included items (finite values only; population std); correct: stored top-1 == gold "
                              "at every answer position; hops_correct: every single hop of meta.hop_ids correct"})
