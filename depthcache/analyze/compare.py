"""compare: several stores' analyses side by side on relative depth l / L (one figure per analysis, one table).

Every result comes from the stores' own analysis caches through ``runner.run`` (computed and saved when missing),
so a comparison costs nothing beyond the analyses it draws. Stores may hold different models, tokenizers, data and
token counts; the table says which tokens each used. layer-map is drawn for every pair of stores holding the same
tokens (same tokenizer, data and windows), the shallower model as the source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.bootstrap import LEVEL, N_RESAMPLES, SEED, max_replicates, percentile_interval, replicates
from depthcache.analyze.effective_depth import CUTOFFS
from depthcache.analyze.layer_map import SITES as LAYER_MAP_SITES
from depthcache.analyze.layer_map import check_same_tokens
from depthcache.analyze.registry import get, parameters
from depthcache.analyze.runner import run
from depthcache.analyze.skip_effects import skip_runs
from depthcache.errors import DepthcacheError
from depthcache.store.io import local_name, model_display_name
from depthcache.store.reader import Store

COMPARED = ("contributions", "residual-norms", "logit-lens", "skip-effects", "effective-depth", "layer-map")
NEEDS = {"contributions": ("resid_pre", "attn_out", "mlp_out"), "residual-norms": ("resid_pre", "resid_final"),
         "logit-lens": ("resid_pre", "resid_final"), "skip-effects": ("attn_out", "mlp_out", "resid_final"),
         "effective-depth": ("resid_pre", "attn_out", "mlp_out", "resid_final")}
INPUTS = {"effective-depth": ("contributions", "logit-lens")}  # computed (or read) first, with the same parameters
LENS_DEPTHS = (0.5, 0.75)  # relative depths at which the table reads the logit-lens KL
COLUMNS = ("model", "store", "layers", "d_model", "dataset", "dataset_sha256", "tokens", "lens_tokens", "skip_tokens",
           *(f"{key}_{part}" for key in CUTOFFS for part in ("layer", "depth")), "rel_first_half",
           "rel_first_half_from_1", "rel_second_half", "skip_later_first_half", "skip_later_second_half",
           *(f"lens_kl_{round(100 * f)}" for f in LENS_DEPTHS), "lens_kl_last")
WITH_CI = (*(f"{key}_depth" for key in CUTOFFS), "rel_first_half", "rel_first_half_from_1", "rel_second_half",
           "skip_later_first_half", "skip_later_second_half", *(f"lens_kl_{round(100 * f)}" for f in LENS_DEPTHS),
           "lens_kl_last")  # the columns with <column>_lo / <column>_hi


@dataclass
class Model:
    """One compared store: its reader, its legend label and where its results are cached."""

    store: Store
    label: str
    results_dir: str | None = None


@dataclass
class Line:
    """One curve of a panel: a model's values over relative depth."""

    label: str
    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray | None = None  # the interval's ends (of y; of x on a categorical panel), where known
    hi: np.ndarray | None = None


@dataclass
class Panel:
    """One axes of a comparison figure."""

    title: str
    ylabel: str
    lines: list[Line]
    xlabel: str = "relative depth l / L"
    yscale: str = "linear"
    zero_line: bool = False
    diagonal: bool = False
    categories: list[str] | None = None  # y is an index into these (one row per model), x a relative depth


@dataclass
class Comparison:
    """What ``compare`` made: the table (and its markdown summary), the figures' panels and paths, the notes on what
    was left out, and the files written."""

    table: pd.DataFrame
    summary: str
    panels: dict[str, list[Panel]]
    figures: list[Path]
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ stores and labels

def labels(stores: Sequence[Store]) -> list[str]:
    """'<model> (<L> layers)' per store, the store's name appended where two would read the same."""
    base = [f"{model_display_name(s.attrs['model'])} ({s.n_layers} layers)" for s in stores]
    return [f"{b}, {local_name(s.location).name}" if base.count(b) > 1 else b for b, s in zip(base, stores)]


def results_dirs(stores: Sequence[Store], results: str | None) -> list[str | None]:
    """Per store, the folder its results go to under ``results`` (named after the store), or None (the default)."""
    if results is None:
        return [None] * len(stores)
    names = [local_name(s.location).name.removesuffix(".zarr") for s in stores]
    taken = [n for n in names if names.count(n) > 1]
    if taken:
        raise DepthcacheError(f"two stores are named {taken[0]!r}: with --results, compare keeps each store's results "
                              "in a folder named after it, so give stores distinct names")
    return [str(Path(results) / name) for name in names]


def open_models(locations: Sequence[str], storage_options: dict[str, Any] | None,
                results: str | None) -> list[Model]:
    """The compared stores, opened and checked, at least two."""
    if len(locations) < 2:
        raise DepthcacheError(f"compare needs at least two stores, got {len(locations)}")
    stores = [Store(str(loc), dict(storage_options or {})) for loc in locations]
    for store in stores:
        store.attrs  # noqa: B018 - schema and provenance checked before any work
    return [Model(s, label, rd) for s, label, rd in zip(stores, labels(stores), results_dirs(stores, results))]


# --------------------------------------------------------------------------------------- what can be compared

def params_for(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters among ``params`` that analysis ``name`` takes."""
    known = parameters(get(name))
    return {k: v for k, v in params.items() if k in known}


def unavailable(name: str, store: Store, params: dict[str, Any]) -> str | None:
    """Why ``store`` cannot give analysis ``name`` (missing sites or skip runs), or None when it can."""
    missing = [a for a in NEEDS[name] if a not in store.ds]
    if missing:
        return f"{store.location} lacks {', '.join(missing)} (extract with --sites resid,attn,mlp)"
    if name == "skip-effects":
        p = params_for(name, params)
        try:
            skip_runs(store, p.get("variant", "current"), p.get("sublayer", "layer"))
        except DepthcacheError as exc:
            return str(exc)
    return None


def same_tokens(shallow: Store, deep: Store) -> bool:
    """Whether two stores hold the same tokens in the same windows with the same tokenizer."""
    try:
        check_same_tokens(shallow, deep)
    except DepthcacheError:
        return False
    return True


def layer_map_pairs(models: Sequence[Model], params: dict[str, Any]) -> list[tuple[Model, Model]]:
    """(shallow, deep) for every pair of stores holding the same tokens and the arrays of the mapped site."""
    site = params_for("layer-map", params).get("site", "resid")
    usable = [m for m in models if all(a in m.store.ds for a in LAYER_MAP_SITES.get(site, ()))]
    pairs = []
    for a, b in combinations(usable, 2):
        if same_tokens(a.store, b.store):
            pairs.append((a, b) if a.store.n_layers <= b.store.n_layers else (b, a))
    return pairs


def check_known_params(names: Sequence[str], params: dict[str, Any]) -> None:
    """Refuse a parameter that no compared analysis (or input of one) takes."""
    used = {n for name in names for n in (name, *INPUTS.get(name, ()))}
    for key in params:
        if not any(key in parameters(get(n)) for n in used):
            raise DepthcacheError(f"no compared analysis ({', '.join(sorted(used))}) has a parameter {key!r}")


def choose(requested: Sequence[str] | None, models: Sequence[Model],
           params: dict[str, Any]) -> tuple[list[str], list[tuple[Model, Model]], list[str]]:
    """The analyses every store can give, the layer-map pairs and notes on what is left out.

    Analyses named in ``requested`` must be available in every store (else one clear error); by default every
    analysis is tried and the ones some store cannot give are left out with a note."""
    unknown = [n for n in requested or () if n not in COMPARED]
    if unknown:
        raise DepthcacheError(f"compare cannot compare {unknown[0]!r}; it compares {', '.join(COMPARED)}")
    names = list(requested or COMPARED)
    check_known_params(names, params)
    chosen, notes = [], []
    pairs: list[tuple[Model, Model]] = []
    for name in names:
        if name == "layer-map":
            pairs = layer_map_pairs(models, params)
            if pairs:
                chosen.append(name)
                continue
            reason = "no two stores hold the same tokens (same tokenizer, --data, --max-tokens and --seq-len)"
        else:
            reason = next((r for m in models if (r := unavailable(name, m.store, params))), None)
            if reason is None:
                chosen.append(name)
                continue
        if requested:
            raise DepthcacheError(f"cannot compare {name}: {reason}")
        notes.append(f"{name} left out: {reason}")
    if not chosen:
        raise DepthcacheError("nothing to compare: " + "; ".join(notes))
    return chosen, pairs, notes


# ------------------------------------------------------------------------------------------------------ results

def gather(names: Sequence[str], models: Sequence[Model], pairs: Sequence[tuple[Model, Model]],
           params: dict[str, Any], **run_kwargs: Any) -> dict[str, list[xr.Dataset]]:
    """Each chosen analysis's result per model (and its inputs': effective-depth's contributions and logit-lens fill
    table columns too); layer-map's per pair."""
    out: dict[str, list[xr.Dataset]] = {}
    for name in names:
        for needed in (*INPUTS.get(name, ()), name):
            if needed == "layer-map":
                out[needed] = [run(needed, shallow.store, deep.store, results_dir=deep.results_dir, **run_kwargs,
                                   **params_for(needed, params)) for shallow, deep in pairs]
            elif needed not in out:
                out[needed] = [run(needed, m.store, results_dir=m.results_dir, **run_kwargs,
                                   **params_for(needed, params)) for m in models]
    return out


# ------------------------------------------------------------------------------------------------------ figures

def curves(results: Sequence[xr.Dataset], names: Sequence[str], values: Any,
           depth: str = "relative_depth", band: Any = None) -> list[Line]:
    """One line per result: ``values(result)`` over the result's relative-depth coordinate ``depth``, with the
    interval ``band(result, 'lo' | 'hi')`` where the result has it."""
    def ends(r: xr.Dataset) -> tuple[np.ndarray | None, np.ndarray | None]:
        if band is None:
            return None, None
        try:
            return tuple(np.asarray(band(r, end), dtype=np.float64) for end in ("lo", "hi"))  # type: ignore[return-value]
        except KeyError:  # a result without intervals
            return None, None
    return [Line(name, np.asarray(r[depth].values, dtype=np.float64), np.asarray(values(r), dtype=np.float64),
                 *ends(r)) for r, name in zip(results, names)]


def bounds(name: str, sublayer: bool = False) -> Any:
    """A ``band`` for ``curves``: the result's ``<name>_lo`` / ``<name>_hi`` (the whole layer's, ``sublayer``)."""
    return lambda r, end: r[f"{name}_{end}"].sel(sublayer="layer") if sublayer else r[f"{name}_{end}"]


def panels(name: str, results: Sequence[xr.Dataset], names: Sequence[str]) -> list[Panel]:
    """The panels of analysis ``name``'s comparison figure, one line per model (or per layer-map pair)."""
    if name == "contributions":
        return [Panel("Whole-layer relative contribution", "mean ‖d_l‖ / ‖h_l‖",
                      curves(results, names, lambda r: r.rel_mean.sel(sublayer="layer"),
                             band=bounds("rel_mean", True)), yscale="log"),
                Panel("Cosine of the layer's contribution with the residual", "mean cos(d_l, h_l)",
                      curves(results, names, lambda r: r.cos_mean.sel(sublayer="layer"),
                             band=bounds("cos_mean", True)), zero_line=True)]
    if name == "residual-norms":
        return [Panel("Residual stream norm entering each layer (1 = final residual)", "mean ‖h_l‖",
                      curves(results, names, lambda r: r.mean_norm, band=bounds("mean_norm")), yscale="log")]
    if name == "logit-lens":
        return [Panel("Logit lens: divergence from the output", "mean KL(lens ‖ output) [nats]",
                      curves(results, names, lambda r: r.kl_mean, band=bounds("kl_mean"))),
                Panel("Logit lens: top-5 overlap with the output", "mean |top5_l ∩ top5_out| / 5",
                      curves(results, names, lambda r: r.top5_overlap, band=bounds("top5_overlap")))]
    if name == "skip-effects":
        x = "skipped_relative_depth"
        return [Panel("Skipping layer s: change of later layers' contributions",
                      "mean over l > s of max ‖Δd_l‖ / ‖d_l‖",
                      curves(results, names, lambda r: r.later_effect, x, bounds("later_effect")),
                      xlabel="relative depth of the skipped layer s / L"),
                Panel("Skipping layer s: change of the output", "mean KL(base ‖ skip) [nats]",
                      curves(results, names, lambda r: r.output_kl_mean, x, bounds("output_kl_mean")), yscale="log",
                      xlabel="relative depth of the skipped layer s / L")]
    if name == "effective-depth":
        offsets = np.linspace(-0.15, 0.15, len(CUTOFFS))  # equal cutoffs of one model stay visible side by side
        return [Panel("Effective-depth cutoffs (no mark: never reached)", "", [
            Line(what, np.array([float(r[f"{key}_depth"]) for r in results]), np.arange(len(results)) + offset,
                 *cutoff_ends(results, key))
            for (key, what), offset in zip(CUTOFFS.items(), offsets)], categories=list(names))]
    if name == "layer-map":
        best = [r.shallow_relative_depth.sel(shallow_layer=r.best_shallow_layer) for r in results]
        return [Panel("Best-mapping shallow layer per deep layer", "shallow model: relative depth",
                      [Line(n, r.deep_relative_depth.values, b.values) for r, n, b in zip(results, names, best)],
                      xlabel="deep model: relative depth", diagonal=True),
                Panel("Error of the best map (held-out tokens)", "mean ‖ŷ − y‖ / ‖y‖",
                      curves(results, names, lambda r: r.rel_error.min("shallow_layer"), "deep_relative_depth"),
                      xlabel="deep model: relative depth")]
    raise ValueError(name)


def cutoff_ends(results: Sequence[xr.Dataset], key: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A cutoff's interval ends (fractions of depth, inf: never) per model, or None when a result has none."""
    if not all(f"{key}_depth_lo" in r for r in results):
        return None, None
    return tuple(np.array([float(r[f"{key}_depth_{end}"]) for r in results]) for end in ("lo", "hi"))  # type: ignore[return-value]


def draw_interval(ax: Any, line: Line, color: str, categorical: bool) -> None:
    """A line's interval: a band around a curve; on a categorical panel a horizontal bar (an end never reached
    runs to depth 1 and is drawn dashed)."""
    if line.lo is None or line.hi is None:
        return
    if not categorical:
        ax.fill_between(line.x, line.lo, line.hi, alpha=0.15, color=color, lw=0)
        return
    for x, y, lo, hi in zip(line.x, line.y, line.lo, line.hi):
        if np.isfinite(lo):
            ax.plot([lo, min(hi, 1.0)], [y, y], color=color, lw=1.5, alpha=0.6, ls="-" if np.isfinite(hi) else "--")


def draw(figure_name: str, figure_panels: Sequence[Panel], title: str, folder: Path) -> Path:
    """A comparison figure in the house style: side-by-side panels, one marked line per model."""
    categorical = any(panel.categories is not None for panel in figure_panels)
    fig, axes = plotting.figure(len(figure_panels), width=12.0 if categorical else 5.5)  # room for long model names
    for ax, panel in zip(axes, figure_panels):
        for line, marker in zip(panel.lines, "osD^v<>p*hX" * 4):
            drawn, = ax.plot(line.x, line.y, marker=marker, ms=4 if categorical else 3,
                             ls="none" if categorical else "-", label=line.label)
            draw_interval(ax, line, drawn.get_color(), categorical)
        if panel.zero_line:
            ax.axhline(0, color="grey", lw=0.8)
        if panel.diagonal:
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="equal relative depth")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel, yscale=panel.yscale)
        if categorical:  # after the scale, which resets the ticks
            ax.set_yticks(range(len(panel.categories)), panel.categories)
            ax.set(ylim=(len(panel.categories) - 0.5, -0.5), xlim=(-0.02, 1.02))
        if categorical:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=3, fontsize=7, title="cutoff",
                      title_fontsize=7, borderaxespad=0.0)  # below the x label
        else:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return plotting.save(fig, folder, figure_name)


def figure_title(name: str, results: Sequence[xr.Dataset], params: dict[str, Any]) -> str:
    """The figure's suptitle: what it shows, how many models, position 0 in or out."""
    first = "included" if params.get("include_first") else "excluded"
    what = {"contributions": "Contributions to the residual", "residual-norms": "Residual norms",
            "logit-lens": "Logit lens", "skip-effects": "Skipping one layer", "effective-depth": "Effective depth",
            "layer-map": "Linear maps shallow → deep"}[name]
    count = f"{len(results)} pair{'s' * (len(results) > 1)}" if name == "layer-map" else f"{len(results)} models"
    ci = ci_options(params)
    bands = "" if name == "layer-map" else \
        f"; bands: {ci.level * 100:g} % percentile-bootstrap intervals over windows ({ci.n_resamples} resamples)"
    return f"{what} — {count}, position 0 {first}{bands}"


# -------------------------------------------------------------------------------------------------------- table

def half_means(depth: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Means of ``values`` over relative depths < 0.5 and ≥ 0.5 (NaNs ignored; NaN for an empty half)."""
    def mean(mask: np.ndarray) -> float:
        finite = values[mask & np.isfinite(values)]
        return float(finite.mean()) if finite.size else float("nan")
    return mean(depth < 0.5), mean(depth >= 0.5)


def lens_columns(lens: xr.Dataset, n_layers: int) -> dict[str, float]:
    """Logit-lens KL at 50 % and 75 % depth (linear in relative depth between layer boundaries) and at the input of
    the last stored layer (at depth 1 the lens is the output itself: KL 0)."""
    depth, kl = lens.relative_depth.values, lens.kl_mean.values
    inputs = lens.layer.values < n_layers
    return {f"lens_kl_{round(100 * f)}": float(np.interp(f, depth, kl)) for f in LENS_DEPTHS} | {
        "lens_kl_last": float(kl[inputs][-1])}


@dataclass(frozen=True)
class CI:
    """The bootstrap's options, as the compared analyses used them (``-p ci_resamples/ci_seed/ci_level``)."""

    n_resamples: int = N_RESAMPLES
    seed: int = SEED
    level: float = LEVEL

    def ends(self, samples: np.ndarray) -> tuple[float, float]:
        """(lo, hi) of a statistic's resampled values."""
        lo, hi = percentile_interval(samples, self.level)
        return float(lo), float(hi)


def ci_options(params: dict[str, Any]) -> CI:
    """The interval options among the comparison's parameters (the analyses' defaults otherwise)."""
    return CI(int(params.get("ci_resamples", N_RESAMPLES)), int(params.get("ci_seed", SEED)),
              float(params.get("ci_level", LEVEL)))


def half_samples(depth: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``half_means`` of every resampled curve (resample, layer): (resample,) first-half and second-half means."""
    import warnings

    with warnings.catch_warnings():  # an empty half is NaN, as half_means says
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(samples[:, depth < 0.5], axis=1), np.nanmean(samples[:, depth >= 0.5], axis=1)


def interval_columns(model: Model, results: dict[str, xr.Dataset], ci: CI) -> dict[str, float]:
    """``<column>_lo`` / ``<column>_hi`` of the table's statistics: each recomputed from every bootstrap resample
    of the results' per-window sums (the draws the analyses' own intervals used)."""
    out: dict[str, float] = {}

    def put(column: str, samples: np.ndarray) -> None:
        out[f"{column}_lo"], out[f"{column}_hi"] = ci.ends(samples)

    if "effective-depth" in results:
        ed = results["effective-depth"]
        for key in CUTOFFS:
            if f"{key}_depth_lo" in ed:
                out[f"{key}_depth_lo"], out[f"{key}_depth_hi"] = (float(ed[f"{key}_depth_{e}"]) for e in ("lo", "hi"))
    if "contributions" in results and "sum_by_window" in results["contributions"]:
        c = results["contributions"]
        q = list(c.quantity.values).index("rel_layer")
        rel = replicates(c.sum_by_window.values[:, q], c.tokens_by_window.values, n_resamples=ci.n_resamples,
                         seed=ci.seed)
        depth, later = c.relative_depth.values, c.layer.values > 0
        first, second = half_samples(depth, rel)
        put("rel_first_half", first)
        put("rel_second_half", second)
        put("rel_first_half_from_1", half_samples(depth[later], rel[:, later])[0])
    if "skip-effects" in results and "max_effect_by_window" in results["skip-effects"]:
        sk = results["skip-effects"]
        maxima = max_replicates(sk.max_effect_by_window.values, ci.n_resamples, ci.seed)  # (resample, skipped, layer)
        later = sk.layer.values[None, :] > sk.skipped_layer.values[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            effect = np.where(later, maxima, 0).sum(-1) / np.where(later.any(1), later.sum(1), np.nan)
        first, second = half_samples(sk.skipped_relative_depth.values, effect)
        put("skip_later_first_half", first)
        put("skip_later_second_half", second)
    if "logit-lens" in results and "sum_by_window" in results["logit-lens"]:
        lens = results["logit-lens"]
        kl = replicates(lens.sum_by_window.sel(stat="kl").values, lens.tokens_by_window.values,
                        n_resamples=ci.n_resamples, seed=ci.seed)  # (resample, boundary)
        depth, inputs = lens.relative_depth.values, lens.layer.values < model.store.n_layers
        for f in LENS_DEPTHS:
            put(f"lens_kl_{round(100 * f)}", np.array([np.interp(f, depth, k) for k in kl]))
        put("lens_kl_last", kl[:, inputs][:, -1])
    return out


def row(model: Model, results: dict[str, xr.Dataset], ci: CI = CI()) -> dict[str, Any]:
    """The table row of one model: its size, its tokens, and each compared analysis's summary numbers with their
    intervals."""
    a = model.store.attrs
    out: dict[str, Any] = {"model": model.label, "store": model.store.location, "layers": model.store.n_layers,
                           "d_model": int(a["model"]["d_model"]), "dataset": Path(str(a["dataset"]["name"])).name,
                           "dataset_sha256": a["dataset"]["sha256"][:12],
                           "tokens": int(a["progress"]["tokens_committed"])}
    if "effective-depth" in results:
        ed = results["effective-depth"]
        for key in CUTOFFS:
            out[f"{key}_layer"], out[f"{key}_depth"] = int(ed[f"{key}_layer"]), float(ed[f"{key}_depth"])
    if "contributions" in results:
        c = results["contributions"]
        rel = c.rel_mean.sel(sublayer="layer")
        out["rel_first_half"], out["rel_second_half"] = half_means(c.relative_depth.values, rel.values)
        later = c.layer.values > 0
        out["rel_first_half_from_1"] = half_means(c.relative_depth.values[later], rel.values[later])[0]
    if "skip-effects" in results:
        s = results["skip-effects"]
        out["skip_later_first_half"], out["skip_later_second_half"] = half_means(
            s.skipped_relative_depth.values, s.later_effect.values)
        out["skip_tokens"] = int(s.attrs["tokens"])
    if "logit-lens" in results:
        lens = results["logit-lens"]
        out |= lens_columns(lens, model.store.n_layers) | {"lens_tokens": int(lens.attrs["tokens"])}
    return out | interval_columns(model, results, ci)


def table(models: Sequence[Model], results: dict[str, list[xr.Dataset]], ci: CI = CI()) -> pd.DataFrame:
    """One row per model (layer-map, a per-pair result, has no column); each statistic followed by its interval's
    ``_lo`` and ``_hi`` columns where the results carry per-window sums."""
    per_model = {n: r for n, r in results.items() if n != "layer-map"}
    frame = pd.DataFrame([row(m, {n: r[i] for n, r in per_model.items()}, ci) for i, m in enumerate(models)])
    order = [x for c in COLUMNS for x in ((c, f"{c}_lo", f"{c}_hi") if c in WITH_CI else (c,))]
    return frame[[c for c in order if c in frame]]


def cell(value: Any) -> str:
    """A markdown cell: integers as is, floats to 4 significant digits, NaN as '–', inf (an interval end never
    reached) as 'never'."""
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else "never" if np.isinf(value) else f"{value:.4g}"
    return str(value)


def with_interval(value: str, lo: Any, hi: Any, depth: bool = False) -> str:
    """'value [lo, hi]' (the interval's ends as ``cell`` writes them; fractions of depth to 2 decimals)."""
    def end(x: Any) -> str:
        return f"{x:.2f}" if depth and np.isfinite(x) else cell(x)
    return f"{value} [{end(lo)}, {end(hi)}]"


def markdown(frame: pd.DataFrame) -> str:
    """The table in markdown, each cutoff as 'layer (fraction)' ('never' when not reached), each statistic with its
    interval as 'value [lo, hi]'."""
    shown = frame.drop(columns=["store"])
    for key in CUTOFFS:
        if f"{key}_layer" in shown:
            lo, hi = (shown.pop(f"{key}_depth_{e}") if f"{key}_depth_{e}" in shown else None for e in ("lo", "hi"))
            cells = [f"{layer} ({depth:.2f})" if layer >= 0 else "never"
                     for layer, depth in zip(shown[f"{key}_layer"], shown.pop(f"{key}_depth"))]
            if lo is not None and hi is not None:
                cells = [with_interval(c, a, b, depth=True) for c, a, b in zip(cells, lo, hi)]
            shown.insert(shown.columns.get_loc(f"{key}_layer"), key, cells)
            shown = shown.drop(columns=f"{key}_layer")
    for column in WITH_CI:
        if f"{column}_lo" in shown:
            lo, hi = shown.pop(f"{column}_lo"), shown.pop(f"{column}_hi")
            shown[column] = [with_interval(cell(v), a, b) for v, a, b in zip(shown[column], lo, hi)]
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    return header + "".join("| " + " | ".join(cell(v) for v in r) + " |\n" for r in shown.itertuples(index=False))


def describe_columns(frame: pd.DataFrame) -> list[str]:
    """One line per column group present: what it means."""
    meaning = {
        "tokens": "tokens: tokens committed in the store (dataset name and the first 12 hex digits of its sha256 say "
                  "which); lens_tokens / skip_tokens: tokens the logit lens / the skip runs read",
        "cos_zero_layer": "effective-depth cutoffs as layer (fraction of depth l / L): "
                          + "; ".join(f"{k}: {v}" for k, v in CUTOFFS.items()),
        "rel_first_half": "rel_first_half / rel_second_half: mean over layers with l / L < 0.5 / ≥ 0.5 of the mean "
                          "over tokens of ‖d_l‖ / ‖h_l‖ (contributions, whole layer); rel_first_half_from_1: the "
                          "first half without layer 0, whose ratio to the small embedding dominates",
        "skip_later_first_half": "skip_later_*: mean over skipped layers s with s / L < 0.5 / ≥ 0.5 of later_effect "
                                 "(skip-effects: mean over l > s of the max over tokens of ‖Δd_l‖ / ‖d_l‖)",
        "lens_kl_50": "lens_kl_50 / lens_kl_75: mean logit-lens KL(lens ‖ output) at 50 % / 75 % of depth (linear "
                      "between layer boundaries); lens_kl_last: at the last layer's input ((L−1) / L; at L the lens "
                      "is the output, KL 0)",
    }
    lines = [text for column, text in meaning.items() if column in frame]
    if any(f"{c}_lo" in frame for c in WITH_CI):
        lines.append("[lo, hi] (CSV: <column>_lo, <column>_hi): percentile-bootstrap interval over windows, each "
                     "statistic recomputed in every resample of the analyses' per-window sums (docs/analyses.md); "
                     "a cutoff's end 'never': not reached in that tail of the resamples; skip_later_*'s upper ends "
                     "sit at or just below the observed value (a resampled max cannot exceed it): read their lower "
                     "ends")
    return lines


# --------------------------------------------------------------------------------------------------------- main

def compare(locations: Sequence[str], out_dir: str | Path, analyses: Sequence[str] | None = None,
            params: dict[str, Any] | None = None, *, force: bool = False, scheduler_address: str | None = None,
            results_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> Comparison:
    """Compare the stores' analyses on relative depth: figures, compare.csv and compare.md in ``out_dir``.

    ``params`` go to every compared analysis that takes them (e.g. include_first, max_tokens); ``results_dir``
    keeps each store's results in a subfolder named after it (for read-only stores)."""
    params = dict(params or {})
    models = open_models(locations, storage_options, results_dir)
    names, pairs, notes = choose(analyses, models, params)
    results = gather(names, models, pairs, params, force=force, scheduler_address=scheduler_address)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_labels = [m.label for m in models]
    pair_labels = [f"{a.label} → {b.label}" for a, b in pairs]
    drawn = {n: panels(n, results[n], pair_labels if n == "layer-map" else model_labels) for n in names}
    figures = [draw(n, drawn[n], figure_title(n, results[n], params), folder) for n in names]
    frame = table(models, results, ci_options(params))
    text = summary(frame, names, notes, params)
    frame.to_csv(folder / "compare.csv", index=False)
    images = "".join(f"![{p.stem}]({p.name})\n" for p in figures)
    (folder / "compare.md").write_text(f"# Comparison\n\n{text}\n{images}")
    return Comparison(frame, text, drawn, figures, notes, [folder / "compare.csv", folder / "compare.md"])


def summary(frame: pd.DataFrame, names: Sequence[str], notes: Sequence[str], params: dict[str, Any]) -> str:
    """The markdown table, what its columns mean, the analyses and parameters, and what was left out."""
    used = json.dumps(params, sort_keys=True) if params else "defaults"
    lines = [markdown(frame), *[f"- {text}" for text in describe_columns(frame)],
             f"- analyses: {', '.join(names)}; parameters: {used}", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"
