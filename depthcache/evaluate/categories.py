"""Pruning by task category (``evaluate categories``): which kinds of task survive the removal of which layers.

Four categories, each a task file of depthcache's own items (written beside the run, so the run can be repeated):
**retrieval** (``retrieval``: a number looked up among 4-32 word-number pairs in the prompt), **knowledge**
(closed-book single-hop facts of ``two-hop-facts``), **reasoning** (half ``addition``, half ``arithmetic-chain``)
and **coherence** (``prose-continuation`` with ``words=2``: under generation, the greedy continuation must give the
real next two words of the sentence). A local GSM8K-style JSONL file (``question``, ``answer`` ending in
``#### <number>``) adds a fifth category, ``gsm8k``. Each category is one ``evaluate prune`` run (likelihood and
generation) in ``OUT/<category>``.

``category_report`` turns such runs (of any models and removal orders) into one figure (accuracy against layers
removed, a panel per category and a row per model, both scorings, percentile-bootstrap bands over items) and a
table: per run and scoring, the full model's score and the most layers removed while every step so far keeps 90 %
of it, each with its bootstrap interval (items resampled with replacement, the same resamples for every step).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthcache.analyze.bootstrap import percentile_interval, replicates
from depthcache.errors import DepthcacheError
from depthcache.tasks import TaskItem, load_task, write_task_jsonl
from depthcache.tasks.base import require_int, subset_indices
from depthcache.textio import read_text

CATEGORIES = {"retrieval": "in-context key-value lookup (retrieval, 4-32 pairs)",
              "knowledge": "closed-book single-hop facts (two-hop-facts, hops = 1)",
              "reasoning": "arithmetic: 2-digit addition and 1-4 step chains (addition, arithmetic-chain)",
              "coherence": "prose continuation, next 2 words (prose-continuation, words=2)",
              "gsm8k": "a local GSM8K-style JSONL file (question, answer '... #### N'): the final number"}
BUILT_IN = ("retrieval", "knowledge", "reasoning", "coherence")
PROTOCOLS = (("choice_correct", "likelihood"), ("exact_match", "generation"))
SHARE = 0.9  # a category "can lose" k layers while every step up to k keeps this share of the full model's score
RESAMPLES = 1000
LEVEL = 0.95
FINAL_NUMBER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def gsm8k_items(path: str | Path) -> list[TaskItem]:
    """Items of a GSM8K-style JSONL file: prompt 'Question: …\\nAnswer:', answer the number after '####'."""
    items = []
    for number, line in enumerate(read_text(Path(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DepthcacheError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
        question, answer = (record.get(k) if isinstance(record, dict) else None for k in ("question", "answer"))
        match = FINAL_NUMBER.search(answer) if isinstance(answer, str) else None
        if not isinstance(question, str) or not question.strip() or match is None:
            raise DepthcacheError(f"{path}, line {number}: a GSM8K-style record needs 'question' and an 'answer' "
                                  "ending in '#### <number>'")
        items.append(TaskItem(id=f"gsm8k-{number:05d}", prompt=f"Question: {question.strip()}\nAnswer:",
                              answer=" " + match.group(1).replace(",", ""), meta={"line": number}))
    if not items:
        raise DepthcacheError(f"{path} holds no records")
    return items


def category_items(category: str, n: int, seed: int = 0, gsm8k: str | None = None) -> list[TaskItem]:
    """``n`` seeded items of a category (reasoning: the first half addition, the rest arithmetic chains)."""
    require_int("n", n, 1)
    if category == "retrieval":
        return load_task("retrieval", n, seed)
    if category == "knowledge":
        facts = [item for item in load_task("two-hop-facts", seed=seed) if item.hops == 1]
        return [facts[i] for i in subset_indices(len(facts), n, seed, "single-hop facts")]
    if category == "reasoning":
        return load_task("addition", n - n // 2, seed) + (load_task("arithmetic-chain", n // 2, seed) if n > 1 else [])
    if category == "coherence":
        return load_task("prose-continuation", n, seed, words=2)
    if category == "gsm8k" and gsm8k is not None:
        items = gsm8k_items(gsm8k)
        return [items[i] for i in subset_indices(len(items), min(n, len(items)), seed, f"records in {gsm8k}")]
    raise DepthcacheError(f"unknown category {category!r}; choose from {', '.join(BUILT_IN)} (gsm8k with a file)")


def parse_categories(spec: str, gsm8k: str | None) -> tuple[str, ...]:
    """'retrieval,knowledge' → the categories in canonical order ('all': the four built in, plus gsm8k with a file)."""
    names = [c.strip() for c in spec.split(",") if c.strip()]
    if names == ["all"]:
        names = [*BUILT_IN, *(["gsm8k"] if gsm8k else [])]
    unknown = sorted(set(names) - set(CATEGORIES))
    if unknown or not names:
        raise DepthcacheError(f"unknown categor(ies) {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(CATEGORIES)} or all")
    if "gsm8k" in names and gsm8k is None:
        raise DepthcacheError("category gsm8k needs --gsm8k FILE (a local GSM8K-style JSONL file)")
    return tuple(c for c in CATEGORIES if c in names)


def run_categories(opts: object, categories: tuple[str, ...], gsm8k: str | None = None) -> list[Path]:
    """One ``evaluate prune`` run per category in ``opts.out``/<category> (``opts``: a PruneOptions whose ``task`` is
    replaced by the category's task file and ``n`` counts that category's items); finished runs are kept, an
    interrupted one resumes. Returns the run folders."""
    from dataclasses import replace

    from depthcache.evaluate.prune import evaluate_prune
    from depthcache.model import load_model, resolve_device

    if opts.out is None:
        raise DepthcacheError("give --out: the folder for one pruning run per category")
    loaded = None
    folders = []
    for category in categories:
        folder = Path(opts.out) / category
        folders.append(folder)
        if (folder / "prune.zarr").is_dir():
            continue
        path = write_task_jsonl(category_items(category, opts.n, opts.seed or 0, gsm8k), folder / f"{category}.jsonl")
        loaded = loaded or load_model(opts.model, device=str(resolve_device(opts.device)), progress=opts.progress)
        evaluate_prune(replace(opts, task=str(path), n=None, seed=None, out=str(folder), resume=True), loaded)
    return folders


def bootstrap_curves(scores: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, steps) mean score of each resample of the items at every step (``scores``: steps × items; the
    same resampled items at every step), drawn by ``depthcache.analyze.bootstrap``."""
    return replicates(scores.T, np.ones(scores.shape[1]), n_resamples=resamples, seed=seed)


def survival(curves: np.ndarray, share: float = SHARE) -> np.ndarray:
    """Per curve (last axis: steps 0, 1, ...), the most steps k such that every step 0..k scores at least ``share``
    × step 0; 0 where the full model (step 0) scores nothing."""
    full = curves[..., :1]
    kept = np.cumprod(curves >= share * full, axis=-1).sum(axis=-1) - 1
    return np.where(full[..., 0] > 0, kept, 0)


@dataclass(frozen=True)
class CategoryRun:
    """One category's pruning run: who and what it scored, and the per-item scores of each protocol (steps × items,
    items without a score dropped)."""

    folder: str
    model: str
    depth: int
    order: str
    category: str
    removed_layer: np.ndarray
    scores: dict[str, np.ndarray]


def open_category_run(folder: str) -> CategoryRun:
    """An ``evaluate categories`` run folder (an ``evaluate prune`` output whose task file is named after a
    category)."""
    from depthcache.evaluate.compare import open_run

    ds = open_run(folder).ds
    category = Path(str(ds.attrs["task"])).stem
    if category not in CATEGORIES:
        raise DepthcacheError(f"{folder}: its task {ds.attrs['task']!r} is not a category's task file (one of "
                              f"{', '.join(f'{c}.jsonl' for c in CATEGORIES)}); run it with `evaluate categories`")
    scores = {}
    for var, protocol in PROTOCOLS:
        values = ds[var].values
        keep = np.isfinite(values).all(axis=0)
        if keep.any():
            scores[protocol] = values[:, keep]
    return CategoryRun(folder, str(ds.attrs["model"]), int(ds.sizes["layer"]), str(ds.attrs["order"]), category,
                       ds.removed_layer.values, scores)


def curve_rows(run: CategoryRun, protocol: str, resamples: int, seed: int, share: float) -> dict[str, object]:
    """The protocol's mean curve with its band, and the table row: full score and layers lost, with intervals."""
    scores = run.scores[protocol]
    boot = bootstrap_curves(scores, resamples, seed)
    low, high = percentile_interval(boot, LEVEL)
    lost_low, lost_high = percentile_interval(survival(boot, share), LEVEL, method="inverted_cdf")
    mean = scores.mean(axis=1)
    return {"model": run.model, "layers": run.depth, "order": run.order, "category": run.category,
            "protocol": protocol, "items": scores.shape[1], "steps": scores.shape[0] - 1,
            "full": float(mean[0]), "full_lo": float(low[0]), "full_hi": float(high[0]),
            "can_lose": int(survival(mean, share)), "can_lose_lo": int(lost_low), "can_lose_hi": int(lost_high),
            "curve": mean, "band": (low, high)}


def markdown(rows: list[dict[str, object]], share: float) -> str:
    """The table as markdown: a censored value (still above the threshold at the last step run) reads '≥ k'."""
    lines = [f"| model | order | category (items) | scoring | full model [95 % CI] | layers it can lose before "
             f"< {share:.0%} of full [95 % CI] |", "|---|---|---|---|---|---|"]
    for r in rows:
        censored = "≥ " if r["can_lose"] == r["steps"] else ""
        lines.append(f"| {r['model']} ({r['layers']} layers) | {r['order']} | {r['category']} ({r['items']}) | "
                     f"{r['protocol']} | {r['full']:.2f} [{r['full_lo']:.2f}, {r['full_hi']:.2f}] | {censored}"
                     f"{r['can_lose']} [{r['can_lose_lo']}, {r['can_lose_hi']}] of {r['steps']} run |")
    return "\n".join(lines)


def plot_categories(rows: list[dict[str, object]], folder: Path, name: str = "prune-categories") -> Path:
    """Accuracy against layers removed: a row of panels per model, a panel per category; a colour per scoring, a
    line style per removal order, bands = the bootstrap intervals over items."""
    from depthcache.analyze import plotting

    models = list(dict.fromkeys(r["model"] for r in rows))
    categories = [c for c in CATEGORIES if any(r["category"] == c for r in rows)]
    orders = list(dict.fromkeys(r["order"] for r in rows))
    plt = plotting.pyplot()
    fig, axes = plt.subplots(len(models), len(categories), figsize=(3.2 * len(categories), 2.8 * len(models)),
                             squeeze=False, sharey=True)
    colours = {"likelihood": "tab:blue", "generation": "tab:red"}
    styles = ("-", "--", ":", "-.")
    for r in rows:
        ax = axes[models.index(r["model"]), categories.index(r["category"])]
        x = np.arange(len(r["curve"]))
        style = styles[orders.index(r["order"]) % len(styles)]
        ax.plot(x, r["curve"], style, color=colours[r["protocol"]], lw=1.3, label=f"{r['protocol']}, {r['order']}")
        ax.fill_between(x, *r["band"], color=colours[r["protocol"]], alpha=0.12, lw=0)
    for i, model in enumerate(models):
        for j, category in enumerate(categories):
            ax = axes[i, j]
            ax.axhline(0.25, color="gray", linestyle=":", linewidth=0.8)
            ax.set(ylim=(-0.03, 1.03), xlabel="layers removed" if i == len(models) - 1 else None,
                   ylabel=f"{model.split(' (')[0]}\naccuracy" if j == 0 else None)
            ax.set_title(category if i == 0 else "", fontsize=9)
            plotting.layer_axis(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes.flat:
        seen.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=4, fontsize=8,
               frameon=False)
    fig.suptitle("Pruning by task category: likelihood (accuracy among 4 choices; dotted: chance) and generation "
                 "(greedy exact match); bands: 95 % bootstrap over items", fontsize=9)
    fig.tight_layout()
    return plotting.save(fig, folder, name)


def category_report(folders: list[str], out: str, resamples: int = RESAMPLES, seed: int = 0, share: float = SHARE
                    ) -> tuple[str, list[Path]]:
    """Read the runs, write ``prune-categories.csv``, ``.md`` and ``.png`` to ``out``; return the markdown table
    and the written paths."""
    require_int("resamples", resamples, 100)
    if not 0 < share <= 1:
        raise DepthcacheError(f"share must be in (0, 1], got {share}")
    if not folders:
        raise DepthcacheError("give at least one category run folder (evaluate categories OUT/<category>)")
    runs = [open_category_run(folder) for folder in folders]
    rows = [curve_rows(run, protocol, resamples, seed, share) for run in runs for protocol in run.scores]
    rows.sort(key=lambda r: (r["model"], r["order"], list(CATEGORIES).index(r["category"]), r["protocol"]))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, share)
    (folder / "prune-categories.md").write_text(text + "\n", encoding="utf-8")
    fields = [k for k in rows[0] if k not in ("curve", "band")]
    with open(folder / "prune-categories.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return text, [folder / "prune-categories.csv", folder / "prune-categories.md", plot_categories(rows, folder)]
