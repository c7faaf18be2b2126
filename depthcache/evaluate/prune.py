"""``depthcache evaluate prune``: a task scored with more and more layers removed, by likelihood and by generation.

Step 0 is the whole model; step k removes the first k layers of the removal order. A removed layer is dropped
from the model's layer list (it returns its input everywhere, as if deleted). Written to ``--out``: the xarray
dataset (prune.zarr), one CSV row per step (prune.csv) and per step and item with the generated text
(prune-items.csv), and a chart of both metrics against the number of layers removed (prune.png).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

import depthcache
from depthcache.errors import DepthcacheError
from depthcache.evaluate.generation import score_generation
from depthcache.evaluate.influence import block_influence
from depthcache.evaluate.likelihood import score_likelihood
from depthcache.evaluate.orders import check_order, fixed_order, greedy_next
from depthcache.evaluate.plot import plot_prune
from depthcache.layerspec import parse_layers
from depthcache.model import (
    DEFAULT_MODEL,
    LoadedModel,
    Placement,
    Structure,
    load_model,
    main_device,
    only_layers,
    resolve_device,
    structure_of,
)
from depthcache.progress import Progress
from depthcache.store.io import require_writable
from depthcache.tasks import TaskItem, load_task

METRICS = ("likelihood", "generation")


@dataclass(frozen=True)
class PruneOptions:
    """What ``evaluate prune`` scores, and where it writes."""

    task: str | None = None  # a depthcache task (built-in or .jsonl); optional with ``harness``
    model: str = DEFAULT_MODEL
    layers: str = "all"  # the candidates for removal
    metrics: tuple[str, ...] = METRICS
    order: str = "last-first"
    n: int | None = 50
    seed: int | None = None
    steps: int | None = None  # most layers removed (default: every candidate, leaving at least one layer)
    max_new_tokens: int = 16
    batch_size: int = 16
    device: str = "auto"
    placement: Placement = Placement()  # --device-map, --max-memory, --offload-folder, --model-dtype
    out: str | None = None  # folder for the outputs (None: return the dataset only)
    progress: bool | None = None  # None: a bar on a terminal, a line per step elsewhere
    resume: bool = False  # continue from OUT/prune.partial
    harness: str | None = None  # score with lm-evaluation-harness: a task YAML, or a task name under include_path
    include_path: str | None = None  # folder of local harness task YAMLs


def parse_metrics(spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """'likelihood,generation' → the metrics in canonical order."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise DepthcacheError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def check_prune_options(opts: PruneOptions) -> None:
    """Refuse bad options before the task or the model is loaded."""
    if opts.task is None and opts.harness is None:
        raise DepthcacheError("give --task (a depthcache task) or --harness (an lm-evaluation-harness task)")
    if opts.harness is not None and opts.task is None and opts.order in ("influence", "greedy"):
        raise DepthcacheError(f"--order {opts.order} ranks layers on --task's items: give --task too, or use "
                              "--order last-first / first-first")
    parse_metrics(opts.metrics)
    check_order(opts.order)
    for name in ("steps", "max_new_tokens", "batch_size"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise DepthcacheError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.out is not None:
        folder = Path(opts.out)
        if folder.exists() and not folder.is_dir():
            raise DepthcacheError(f"--out {opts.out} is a file: give a folder for the outputs")
        require_writable(folder)  # missing folders are created when the outputs are written


@dataclass
class Scorer:
    """Scores the task items with a given set of layers removed."""

    loaded: LoadedModel
    structure: Structure
    items: list[TaskItem]
    opts: PruneOptions
    device: str
    scored: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def kept(self, removed: list[int]) -> list[int]:
        """The layers left after removing ``removed``."""
        return [layer for layer in range(self.structure.n_layers) if layer not in removed]

    def likelihood(self, removed: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Gold log-prob and choice correctness per item (each set of removed layers scored once: the greedy order
        scores the layer it then removes)."""
        key = tuple(sorted(removed))
        if key not in self.scored:
            with only_layers(self.loaded.model, self.structure, self.kept(removed)):
                self.scored[key] = score_likelihood(self.loaded.model, self.loaded.tokenizer, self.items,
                                                    self.opts.batch_size, self.device)
        return self.scored[key]

    def generation(self, removed: list[int]) -> tuple[np.ndarray, list[str]]:
        """Exact match and generated text per item."""
        with only_layers(self.loaded.model, self.structure, self.kept(removed)):
            return score_generation(self.loaded.model, self.loaded.tokenizer, self.items, self.opts.batch_size,
                                    self.opts.max_new_tokens, self.device)

    def mean_logprob(self, removed: list[int]) -> float:
        """Mean gold log-prob over the items (the greedy order's criterion)."""
        return float(self.likelihood(removed)[0].mean())


def step_results(scorer: Scorer, removed: list[int], metrics: tuple[str, ...]) -> dict[str, object]:
    """Per-item results of every requested metric with ``removed`` layers removed (NaN / '' where not requested)."""
    n = len(scorer.items)
    gold, correct, match, texts = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), [""] * n
    if "likelihood" in metrics:
        gold, correct = scorer.likelihood(removed)
    if "generation" in metrics:
        match, texts = scorer.generation(removed)
    return {"gold_logprob": gold, "choice_correct": correct, "exact_match": match, "generated": texts}


def next_removal(scorer: Scorer, candidates: tuple[int, ...], removed: list[int], influence: np.ndarray
                 ) -> tuple[int, float]:
    """The layer removed at the next step and, in the greedy order, the mean gold log-prob that chose it."""
    if scorer.opts.order != "greedy":
        return fixed_order(candidates, scorer.opts.order, influence)[len(removed)], np.nan
    return greedy_next(removed, [c for c in candidates if c not in removed], scorer.mean_logprob)


def job_identity(opts: PruneOptions, loaded: LoadedModel, items: list[TaskItem], device: str) -> dict[str, object]:
    """What every step's numbers depend on: an interrupted run resumes only with all of it unchanged (the number
    of steps may grow)."""
    model = loaded.provenance
    return {"model": model.get("weights_sha256") or model["spec"], "code_version": depthcache.__version__,
            "items": [[it.id, it.prompt, it.answer, list(it.choices)] for it in items], "device": device,
            "metrics": list(parse_metrics(opts.metrics)),
            **{k: v for k, v in asdict(opts).items() if k in ("layers", "order", "max_new_tokens", "batch_size")}}


def finite_mean(x: np.ndarray) -> np.ndarray:
    """Mean over items (axis 1) of the finite values; NaN where there are none (metric not computed, no choices)."""
    finite = np.isfinite(x)
    counts = finite.sum(axis=1)
    return np.where(counts > 0, np.where(finite, x, 0).sum(axis=1) / np.maximum(counts, 1), np.nan)


def summary_means(per_item: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """Per-step means of the per-item results (accuracy over the items that have choices)."""
    return {"mean_gold_logprob": ("step", finite_mean(per_item["gold_logprob"])),
            "choice_accuracy": ("step", finite_mean(per_item["choice_correct"])),
            "exact_match_rate": ("step", finite_mean(per_item["exact_match"]))}


def evaluate_prune(opts: PruneOptions, loaded: LoadedModel | None = None) -> xr.Dataset:
    """Score ``opts.task`` with 0, 1, 2, ... layers removed; writes the outputs when ``opts.out`` is set, saving
    each step as it finishes in OUT/prune.partial (``opts.resume`` continues from there)."""
    check_prune_options(opts)
    if opts.harness is not None:
        from depthcache.evaluate.harness import harness_prune

        return harness_prune(opts)
    metrics = parse_metrics(opts.metrics)
    items = load_task(opts.task, opts.n, opts.seed)
    device = str(resolve_device(opts.device))
    journal = None if opts.out is None else Journal(Path(opts.out) / "prune.partial")
    if journal is not None and journal.exists() and not opts.resume:
        raise DepthcacheError(f"{journal.folder} holds an interrupted run: continue it with --resume, or delete it "
                              "to start over")
    loaded = loaded or load_model(opts.model, device=device, progress=opts.progress, placement=opts.placement)
    device = main_device(loaded.model)  # a device map's first GPU, else the host
    structure = structure_of(loaded.model)
    depth = structure.n_layers
    candidates = parse_layers(opts.layers, depth)
    steps = min(opts.steps or len(candidates), len(candidates), depth - 1)
    scorer = Scorer(loaded, structure, items, opts, device)
    saved = journal.start(job_identity(opts, loaded, items, device)) if journal is not None else []
    results = saved[:steps + 1]
    with Progress("prune", steps + 1, "steps", opts.progress, done=len(results)) as bar:
        bar.note("block influence")
        influence = block_influence(loaded.model, structure, loaded.tokenizer, [it.prompt for it in items],
                                    opts.batch_size, device)
        for k in range(len(results), steps + 1):
            removed = [int(r["removed_layer"]) for r in results[1:]]
            layer, score = -1, np.nan
            if k:
                bar.note(f"step {k}: choosing the layer to remove" if opts.order == "greedy" else f"step {k}")
                layer, score = next_removal(scorer, candidates, removed, influence)
            bar.note(f"step {k}: scoring without {', '.join(map(str, removed + [layer])) if k else 'any layer'}")
            step = step_results(scorer, removed + [layer] if k else [], metrics)
            step |= {"removed_layer": layer, "greedy_score": score}
            if journal is not None:
                journal.save(k, step)
            results.append(step)
            bar.update()
    ds = prune_dataset(results, items, influence, opts, metrics, candidates, device, loaded.provenance["display_name"])
    if opts.out is not None:
        write_outputs(ds, Path(opts.out))
        journal.remove()
    return ds


def prune_dataset(results: list[dict[str, object]], items: list[TaskItem], influence: np.ndarray, opts: PruneOptions,
                  metrics: tuple[str, ...], candidates: tuple[int, ...], device: str, model_name: str) -> xr.Dataset:
    """Every step's per-item results and their means as one dataset (step k: the first k layers removed)."""
    per_item = {k: np.stack([np.asarray(r[k], dtype=np.float64) for r in results])
                for k in ("gold_logprob", "choice_correct", "exact_match")}
    order = [int(r["removed_layer"]) for r in results[1:]]
    steps, depth = len(results) - 1, len(influence)
    return xr.Dataset(
        {**{k: (("step", "item"), v) for k, v in per_item.items()}, **summary_means(per_item),
         "generated": (("step", "item"), np.array([list(r["generated"]) for r in results], dtype=object)),
         "greedy_score": ("step", np.array([float(r["greedy_score"]) for r in results])),
         "block_influence": ("layer", influence)},
        coords={"step": np.arange(steps + 1), "n_removed": ("step", np.arange(steps + 1)),
                "removed_layer": ("step", np.array([-1, *order])),
                "removed": ("step", np.array([",".join(map(str, order[:k])) for k in range(steps + 1)], dtype=object)),
                "item_id": ("item", np.array([it.id for it in items], dtype=object)),
                "hops": ("item", np.array([it.hops for it in items])),
                "n_choices": ("item", np.array([len(it.choices) for it in items])), "layer": np.arange(depth),
                "relative_depth": ("layer", np.arange(depth) / depth)},
        attrs={"model": model_name, "model_spec": opts.model, "task": opts.task,
               "metrics": ",".join(metrics), "order": opts.order,
               "candidates": json.dumps(list(candidates)), "options": json.dumps(asdict(opts) | {"device": device}),
               "description": "step k: the model with the first k layers of the removal order removed; "
                              "gold_logprob: summed log-prob (nats) of the gold answer; choice_correct: the gold "
                              "answer has the highest log-prob among the choices; exact_match: the greedy answer "
                              "(first line, as many words as the gold, end punctuation and case ignored) equals it"})


class Journal:
    """The finished steps of a pruning run: one JSON file per step beside ``job.json`` (what they depend on), each
    written to a temporary file renamed into place, so a kill leaves whole steps only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def exists(self) -> bool:
        """True when an interrupted run left steps (or its job file) here."""
        return self.folder.is_dir()

    def start(self, identity: dict[str, object]) -> list[dict[str, object]]:
        """The saved steps 0, 1, ... of a run with this ``identity`` (refusing another's); creates the folder."""
        text = json.dumps(identity, sort_keys=True, indent=1)
        job = self.folder / "job.json"
        if job.is_file() and job.read_text() != text:
            raise DepthcacheError(f"{self.folder} was started with another model, task items or options (see "
                                  f"{job}): rerun with those, or delete it to start over")
        if not job.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(job, text)
        steps = []
        while (path := self.folder / f"step-{len(steps):04d}.json").is_file():
            steps.append(json.loads(path.read_text()))
        return steps

    def save(self, k: int, step: dict[str, object]) -> None:
        """Write step ``k`` whole."""
        plain = {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in step.items()}
        atomic_write(self.folder / f"step-{k:04d}.json", json.dumps(plain))

    def remove(self) -> None:
        """Delete the journal (the outputs are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_outputs(ds: xr.Dataset, folder: Path) -> list[Path]:
    """prune.zarr, prune.csv (per step), prune-items.csv (per step and item) and prune.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(folder / "prune.zarr", mode="w", zarr_format=3, consolidated=False)
    steps = ds[["n_removed", "removed_layer", "removed", "mean_gold_logprob", "choice_accuracy", "exact_match_rate",
                "greedy_score"]].to_dataframe()
    steps.to_csv(folder / "prune.csv")
    items = ds[["removed", "item_id", "gold_logprob", "choice_correct", "exact_match", "generated"]].to_dataframe()
    items.to_csv(folder / "prune-items.csv")
    return [folder / "prune.zarr", folder / "prune.csv", folder / "prune-items.csv", plot_prune(ds, folder)]
