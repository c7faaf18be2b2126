"""Pruning runs of several models side by side on relative depth: one table and one figure (``evaluate compare``).

Each run is an ``evaluate prune`` output folder (its ``prune.zarr``). The x axis is the fraction of the model's
layers removed (k / L), so models of different depths share it. Per run the table gives the full model's scores and
how far each metric survives: the most layers removed while it stays at or above half of the full model's score
(every step up to that one), which is the likelihood-vs-generation contrast of the pruning studies in one number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from depthcache.errors import DepthcacheError

METRICS = (("choice_accuracy", "likelihood: accuracy among choices"),
           ("exact_match_rate", "generation: exact match (greedy)"))
SURVIVAL = 0.5  # a metric "survives" k removals while every step up to k keeps this share of the full score


@dataclass(frozen=True)
class PruneRun:
    """One pruning run: its results and where they came from."""

    folder: str
    ds: xr.Dataset

    @property
    def depth(self) -> int:
        """The model's number of layers (block influence has one value per layer)."""
        return int(self.ds.sizes["layer"])

    @property
    def label(self) -> str:
        """Model, depth and removal order, as the figure's legend and the table name a run."""
        return f"{self.ds.attrs['model']} ({self.depth} layers), {self.ds.attrs['order']}"


def open_run(folder: str) -> PruneRun:
    """An ``evaluate prune`` output folder's results, or one line saying why it is not one."""
    path = Path(folder) / "prune.zarr"
    if not path.is_dir():
        raise DepthcacheError(f"{folder}: no prune.zarr here (not an `evaluate prune` output folder; a run still "
                              "in progress or interrupted has only prune.partial)")
    try:
        ds = xr.open_zarr(path, consolidated=False).load()
    except Exception as exc:  # noqa: BLE001 - any unreadable store is one line, not a traceback
        raise DepthcacheError(f"{path}: cannot be read as pruning results ({exc})") from exc
    missing = [name for name in ("n_removed", "layer", *dict(METRICS)) if name not in ds.variables]
    if missing or not {"model", "order", "task"} <= set(ds.attrs):
        raise DepthcacheError(f"{path}: not pruning results (missing {', '.join(missing) or 'model/order/task'})")
    return PruneRun(folder, ds)


def survives(scores: np.ndarray) -> int:
    """The most steps k such that every step 0..k scores at least SURVIVAL × step 0 (0 when the full model scores
    nothing)."""
    if not np.isfinite(scores[0]) or scores[0] <= 0:
        return 0
    below = np.flatnonzero(~(scores >= SURVIVAL * scores[0]))
    return int(below[0] - 1) if len(below) else len(scores) - 1


def table(runs: list[PruneRun]) -> list[dict[str, object]]:
    """One row per run: depth, items, full-model scores, and each metric's survival as layers and as k / L."""
    rows = []
    for run in runs:
        row: dict[str, object] = {"model": run.ds.attrs["model"], "layers": run.depth, "order": run.ds.attrs["order"],
                                  "task": run.ds.attrs["task"], "items": int(run.ds.sizes["item"]),
                                  "steps": int(run.ds.sizes["step"]) - 1}
        for name, _ in METRICS:
            scores = run.ds[name].values
            row[f"{name}_full"] = float(scores[0])
            k = survives(scores)
            row[f"{name}_survives"] = k
            row[f"{name}_survives_fraction"] = k / run.depth
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """The table as markdown (scores to 2 decimals, survival as 'k (k / L)')."""
    head = ("| model | layers | order | task (items) | likelihood acc., full | survives | exact match, full | "
            "survives |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['order']} | {r['task']} ({r['items']}) | "
                     f"{r['choice_accuracy_full']:.2f} | {r['choice_accuracy_survives']} "
                     f"({r['choice_accuracy_survives_fraction']:.2f}) | {r['exact_match_rate_full']:.2f} | "
                     f"{r['exact_match_rate_survives']} ({r['exact_match_rate_survives_fraction']:.2f}) |")
    return "\n".join(lines)


def plot_comparison(runs: list[PruneRun], folder: Path, name: str = "prune-compare") -> Path:
    """Two panels on the fraction of layers removed: likelihood accuracy among choices and greedy exact match, one
    line per run (a colour per model, a line style per removal order)."""
    from depthcache.analyze import plotting
    from depthcache.evaluate.plot import chance_accuracy

    fig, axes = plotting.figure(2, width=5.2, height=3.8)
    models = list(dict.fromkeys(run.ds.attrs["model"] for run in runs))
    orders = list(dict.fromkeys(run.ds.attrs["order"] for run in runs))
    styles = ("o-", "s--", "^:", "d-.")
    for ax, (var, title) in zip(axes, METRICS):
        for run in runs:
            colour = f"C{models.index(run.ds.attrs['model'])}"
            style = styles[orders.index(run.ds.attrs["order"]) % len(styles)]
            ax.plot(run.ds.n_removed.values / run.depth, run.ds[var].values, style, color=colour, ms=3,
                    label=run.label)
        ax.set(xlabel="fraction of layers removed (k / L)", ylabel="accuracy", ylim=(-0.03, 1.03))
        ax.set_title(title, fontsize=9)
    chances = {chance_accuracy(run.ds) for run in runs} - {None}
    if len(chances) == 1:
        axes[0].axhline(chances.pop(), color="gray", linestyle=":", linewidth=1, label="chance among choices")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=2,
               fontsize=7, frameon=False)
    tasks = sorted({f"{run.ds.attrs['task']} ({run.ds.sizes['item']} items)" for run in runs})
    fig.suptitle(f"Pruning, likelihood vs generation: {', '.join(tasks)}", fontsize=9)
    return plotting.save(fig, folder, name)


def compare_pruning(folders: list[str], out: str) -> tuple[str, list[Path]]:
    """Read the runs, write ``prune-compare.csv``, ``prune-compare.md`` and ``prune-compare.png`` to ``out``, and
    return the markdown table with the written paths."""
    if not folders:
        raise DepthcacheError("give at least one `evaluate prune` output folder")
    runs = [open_run(folder) for folder in folders]
    rows = table(runs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    (folder / "prune-compare.md").write_text(text + "\n")
    with open(folder / "prune-compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return text, [folder / "prune-compare.csv", folder / "prune-compare.md", plot_comparison(runs, folder)]
