"""lm-evaluation-harness backend ``depthcache``: a model with a set of layers removed, scored by the harness itself.

``DepthcacheLM`` is the harness's own Hugging Face backend (``HFLM``: its tokenization, batching, log-likelihood and
generate_until code) around a model that depthcache loads (aliases, GGUF, folders, hub ids, or a model object) and
runs with the layers ``remove`` taken out. lm-eval 0.4 finds backends only in its registry, which this module fills
on import, so the command line is ``python -m depthcache.evaluate.harness`` (or ``depthcache lm-eval``) with the
arguments of ``lm_eval``::

    depthcache lm-eval --model depthcache --model_args pretrained=smollm2-135m,remove=20-29 \\
        --tasks two_hop_facts_mc --include_path examples/lm-eval

``write_harness_task`` exports a built-in task as local harness task files (JSONL data + YAML, no hub access).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from depthcache.errors import DepthcacheError
from depthcache.evaluate.generation import normalise, parse_answer
from depthcache.layerspec import parse_layers
from depthcache.model import LoadedModel, load_model, n_layers, removed_layers, resolve_device, wrap_model
from depthcache.tasks import TaskItem, load_task

MAX_GEN_TOKS = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_remove(remove: str | int | Iterable[int] | None, depth: int) -> tuple[int, ...]:
    """'20-29', '3+7' (a '+' or ';' joins ranges, since lm_eval splits model_args at commas), 5, [3, 7] or None."""
    if remove is None or remove == "":
        return ()
    if isinstance(remove, int):
        remove = str(remove)
    if not isinstance(remove, str):
        return parse_layers(",".join(map(str, remove)), depth)
    return parse_layers(remove.replace("+", ",").replace(";", ","), depth)


class DepthcacheLM(HFLM):
    """The harness's HF backend around a depthcache-loaded model with layers ``remove`` taken out (``removed`` may
    be changed between evaluations: the model itself is only pruned while the harness calls it)."""

    def __init__(self, pretrained: Any = "smollm2-135m", remove: str | int | Iterable[int] | None = None,
                 tokenizer: Any = None, device: str | None = None, dtype: str = "float32", **kwargs: Any) -> None:
        if isinstance(pretrained, LoadedModel):
            loaded = pretrained
        elif isinstance(pretrained, str):
            if dtype not in DTYPES:
                raise DepthcacheError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            loaded = load_model(pretrained, device=str(resolve_device(device or "auto")), dtype=DTYPES[dtype])
        else:
            loaded = wrap_model(pretrained, tokenizer)
        self.loaded = loaded
        self.removed = parse_remove(remove, n_layers(loaded.model))
        kwargs.pop("backend", None)
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", **kwargs)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        with removed_layers(self.loaded.model, self.removed):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        with removed_layers(self.loaded.model, self.removed):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        with removed_layers(self.loaded.model, self.removed):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)


if "depthcache" not in model_registry:
    model_registry.register("depthcache")(DepthcacheLM)


def task_records(items: list[TaskItem]) -> list[dict[str, Any]]:
    """The harness's rows of a task: id, prompt, answer, choices, gold (the answer's index among the choices), hops."""
    return [{"id": it.id, "prompt": it.prompt, "answer": it.answer, "choices": list(it.choices),
             "gold": it.choices.index(it.answer) if it.choices else -1, "hops": it.hops} for it in items]


def task_dataset(path: str | Path) -> Any:
    """A task JSONL file (written by ``write_harness_task``) as the DatasetDict the harness reads (split 'test')."""
    import datasets

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def generation_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """exact_match as ``evaluate prune`` scores it: the first line's first as many words as the gold answer has,
    end punctuation and case ignored."""
    return {"exact_match": float(parse_answer(results[0], doc["answer"]) == normalise(doc["answer"]))}


def likelihood_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """The gold answer's summed log-prob (nats) and whether greedy decoding would produce it."""
    logprob, greedy = results[0]
    return {"gold_logprob": float(logprob), "greedy_match": float(greedy)}


UTILS = '''"""lm-evaluation-harness hooks for depthcache task files: the data is the .jsonl beside this file."""

from pathlib import Path

from depthcache.evaluate.harness import generation_results, likelihood_results, task_dataset


def load(data_file, **_):
    return task_dataset(Path(__file__).with_name(data_file))


process_generation = generation_results
process_likelihood = likelihood_results
'''


def task_yaml(name: str, data_file: str, mode: str) -> str:
    """One harness task YAML: ``mc`` (multiple_choice, acc), ``gen`` (generate_until, exact_match) or ``ll``
    (loglikelihood of the gold answer)."""
    head = (f"task: {name}_{mode}\ncustom_dataset: !function utils.load\ndataset_kwargs:\n  data_file: {data_file}\n"
            "test_split: test\ndoc_to_text: prompt\ntarget_delimiter: \"\"\n")
    metric = "  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    if mode == "mc":
        body = ("output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n"
                + metric.format("acc"))
    elif mode == "gen":
        body = (f"output_type: generate_until\ndoc_to_target: answer\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                f"  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\nprocess_results: !function "
                f"utils.process_generation\nmetric_list:\n" + metric.format("exact_match"))
    else:
        body = ("output_type: loglikelihood\ndoc_to_target: answer\nprocess_results: !function utils.process_likelihood"
                "\nmetric_list:\n" + metric.format("gold_logprob") + metric.format("greedy_match"))
    return head + body + "metadata:\n  version: 1.0\n"


def write_harness_task(task: str, folder: str | Path, n: int | None = None, seed: int | None = None) -> list[str]:
    """Export a depthcache task (built-in name or .jsonl file) as local harness tasks in ``folder``: the items as
    JSONL, ``utils.py`` and one YAML per mode (``<name>_mc`` when items have choices, ``<name>_gen``, ``<name>_ll``);
    returns the harness task names."""
    items = load_task(task, n, seed)
    name = Path(task).stem.replace("-", "_")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = f"{name}.jsonl"
    (folder / data_file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_records(items)),
                                    encoding="utf-8")
    (folder / "utils.py").write_text(UTILS, encoding="utf-8")
    modes = (("mc",) if all(it.choices for it in items) else ()) + ("gen", "ll")
    for mode in modes:
        (folder / f"{name}_{mode}.yaml").write_text(task_yaml(name, data_file, mode), encoding="utf-8")
    return [f"{name}_{mode}" for mode in modes]


def resolve_tasks(tasks: str, include_path: str | None) -> tuple[list[str], list[str] | None]:
    """(harness task names, folders to include) for comma-separated task names and task YAML files (a YAML's folder
    is included)."""
    names, folders = [], [include_path] if include_path is not None else []
    if include_path is not None and not Path(include_path).is_dir():
        raise DepthcacheError(f"--include-path {include_path} is not a folder")
    for task in filter(None, (t.strip() for t in tasks.split(","))):
        path = Path(task)
        if path.suffix not in (".yaml", ".yml"):
            names.append(task)
            continue
        if not path.is_file():
            raise DepthcacheError(f"harness task file {task} not found")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("task:")]
        if not lines:
            raise DepthcacheError(f"{task} has no 'task:' line: not a harness task YAML")
        names.append(lines[0].split(":", 1)[1].strip().strip("'\""))
        folders.append(str(path.resolve().parent))
    if not names:
        raise DepthcacheError("--harness names no task")
    return names, sorted(set(folders)) or None


def harness_metrics(lm: DepthcacheLM, tasks: list[str], include_path: str | list[str] | None, limit: int | None
                    ) -> dict[str, float]:
    """Run the harness on ``tasks`` (local task files under ``include_path``; no hub) and return every numeric
    metric as '<task>.<metric>' (stderr included)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    try:
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0, verbosity="ERROR")
    except KeyError as exc:
        raise DepthcacheError(f"the harness knows no task {tasks} ({exc}); give a task YAML or --include-path") from exc
    out: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "samples":
                out[f"{task}.{metric}"] = float(value)
    return out


def harness_prune(opts: Any) -> Any:
    """``evaluate prune --harness TASK``: the harness's metrics of TASK with 0, 1, 2, ... layers removed (the removal
    order as in ``evaluate prune``; influence and greedy orders rank layers on ``--task``'s items)."""
    import numpy as np
    import xarray as xr

    from depthcache.evaluate.influence import block_influence
    from depthcache.evaluate.orders import fixed_order
    from depthcache.evaluate.prune import Scorer, next_removal
    from depthcache.model import structure_of

    names, include = resolve_tasks(opts.harness, opts.include_path)
    device = str(resolve_device(opts.device))
    loaded = load_model(opts.model, device=device)
    structure = structure_of(loaded.model)
    depth = structure.n_layers
    candidates = parse_layers(opts.layers, depth)
    steps = min(opts.steps or len(candidates), len(candidates), depth - 1)
    if opts.task is not None:  # the influence and greedy orders rank layers on --task's items
        items = load_task(opts.task, opts.n, opts.seed)
        influence = block_influence(loaded.model, structure, loaded.tokenizer, [it.prompt for it in items],
                                    opts.batch_size, device)
        scorer, order = Scorer(loaded, structure, items, opts, device), []
        for _ in range(steps):
            order.append(next_removal(scorer, candidates, order, influence)[0])
    else:
        order = fixed_order(candidates, opts.order, np.zeros(depth))[:steps]
    lm = DepthcacheLM(loaded, batch_size=opts.batch_size)
    rows = []
    for k in range(steps + 1):
        lm.removed = tuple(order[:k])
        rows.append(harness_metrics(lm, names, include, opts.n))
    keys = sorted({key for row in rows for key in row if not key.endswith(".sample_len")})
    ds = xr.Dataset({key: ("step", np.array([row.get(key, np.nan) for row in rows])) for key in keys},
                    coords={"step": np.arange(steps + 1), "n_removed": ("step", np.arange(steps + 1)),
                            "removed_layer": ("step", np.array([-1, *order])),
                            "removed": ("step", np.array([",".join(map(str, order[:k])) for k in range(steps + 1)],
                                                         dtype=object))},
                    attrs={"model": opts.model, "harness_tasks": ",".join(names), "order": opts.order,
                           "candidates": json.dumps(list(candidates)),
                           "description": "step k: the model with the first k layers of the removal order removed, "
                                          "scored by lm-evaluation-harness (metrics named <task>.<metric>)"})
    if opts.out is not None:
        folder = Path(opts.out)
        folder.mkdir(parents=True, exist_ok=True)
        ds.to_zarr(folder / "prune-harness.zarr", mode="w", zarr_format=3, consolidated=False,
                   encoding={"removed": {"dtype": object}})
        ds.to_dataframe().to_csv(folder / "prune-harness.csv")
    return ds


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line with the ``depthcache`` backend registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
