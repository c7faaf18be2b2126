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
           depth: str = "relative_depth") -> list[Line]:
    """One line per result: ``values(result)`` over the result's relative-depth coordinate ``depth``."""
    return [Line(name, np.asarray(r[depth].values, dtype=np.float64), np.asarray(values(r), dtype=np.float64))
            for r, name in zip(results, names)]


def panels(name: str, results: Sequence[xr.Dataset], names: Sequence[str]) -> list[Panel]:
    """The panels of analysis ``name``'s comparison figure, one line per model (or per layer-map pair)."""
    if name == "contributions":
        return [Panel("Whole-layer relative contribution", "mean ‖d_l‖ / ‖h_l‖",
                      curves(results, names, lambda r: r.rel_mean.sel(sublayer="layer")), yscale="log"),
                Panel("Cosine of the layer's contribution with the residual", "mean cos(d_l, h_l)",
                      curves(results, names, lambda r: r.cos_mean.sel(sublayer="layer")), zero_line=True)]
    if name == "residual-norms":
        return [Panel("Residual stream norm entering each layer (1 = final residual)", "mean ‖h_l‖",
                      curves(results, names, lambda r: r.mean_norm), yscale="log")]
    if name == "logit-lens":
        return [Panel("Logit lens: divergence from the output", "mean KL(lens ‖ output) [nats]",
                      curves(results, names, lambda r: r.kl_mean)),
                Panel("Logit lens: top-5 overlap with the output", "mean |top5_l ∩ top5_out| / 5",
                      curves(results, names, lambda r: r.top5_overlap))]
    if name == "skip-effects":
        x = "skipped_relative_depth"
        return [Panel("Skipping layer s: change of later layers' contributions",
                      "mean over l > s of max ‖Δd_l‖ / ‖d_l‖",
                      curves(results, names, lambda r: r.later_effect, x),
                      xlabel="relative depth of the skipped layer s / L"),
                Panel("Skipping layer s: change of the output", "mean KL(base ‖ skip) [nats]",
                      curves(results, names, lambda r: r.output_kl_mean, x), yscale="log",
                      xlabel="relative depth of the skipped layer s / L")]
    if name == "effective-depth":
        offsets = np.linspace(-0.15, 0.15, len(CUTOFFS))  # equal cutoffs of one model stay visible side by side
        return [Panel("Effective-depth cutoffs (no mark: never reached)", "", [
            Line(what, np.array([float(r[f"{key}_depth"]) for r in results]), np.arange(len(results)) + offset)
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


def draw(figure_name: str, figure_panels: Sequence[Panel], title: str, folder: Path) -> Path:
    """A comparison figure in the house style: side-by-side panels, one marked line per model."""
    categorical = any(panel.categories is not None for panel in figure_panels)
    fig, axes = plotting.figure(len(figure_panels), width=12.0 if categorical else 5.5)  # room for long model names
    for ax, panel in zip(axes, figure_panels):
        for line, marker in zip(panel.lines, "osD^v<>p*hX" * 4):
            ax.plot(line.x, line.y, marker=marker, ms=4 if categorical else 3, ls="none" if categorical else "-",
                    label=line.label)
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
    return f"{what} — {count}, position 0 {first}"


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


def row(model: Model, results: dict[str, xr.Dataset]) -> dict[str, Any]:
    """The table row of one model: its size, its tokens, and each compared analysis's summary numbers."""
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
    return out


def table(models: Sequence[Model], results: dict[str, list[xr.Dataset]]) -> pd.DataFrame:
    """One row per model (layer-map, a per-pair result, has no column)."""
    per_model = {n: r for n, r in results.items() if n != "layer-map"}
    frame = pd.DataFrame([row(m, {n: r[i] for n, r in per_model.items()}) for i, m in enumerate(models)])
    return frame[[c for c in COLUMNS if c in frame]]


def cell(value: Any) -> str:
    """A markdown cell: integers as is, floats to 4 significant digits, NaN as '–'."""
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown(frame: pd.DataFrame) -> str:
    """The table in markdown, each cutoff as 'layer (fraction)' ('never' when not reached)."""
    shown = frame.drop(columns=["store"])
    for key in CUTOFFS:
        if f"{key}_layer" in shown:
            cells = [f"{layer} ({depth:.2f})" if layer >= 0 else "never"
                     for layer, depth in zip(shown[f"{key}_layer"], shown.pop(f"{key}_depth"))]
            shown.insert(shown.columns.get_loc(f"{key}_layer"), key, cells)
            shown = shown.drop(columns=f"{key}_layer")
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
    return [text for column, text in meaning.items() if column in frame]


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
    frame = table(models, results)
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
