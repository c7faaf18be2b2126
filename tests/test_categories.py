"""Pruning by task category: the categories' items, the bootstrap bands and the 90 % table against direct
computations, and the commands end to end on a tiny model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.evaluate.categories import (
    bootstrap_curves,
    category_items,
    category_report,
    gsm8k_items,
    parse_categories,
    survival,
)
from depthcache.evaluate.prune import PruneOptions, prune_dataset, write_outputs
from depthcache.tasks import load_task, write_task_jsonl


def direct_survival(curve: list[float], share: float) -> int:
    """The most steps k with every step 0..k at least share × step 0, by walking the curve (0 if step 0 is 0)."""
    if curve[0] <= 0:
        return 0
    k = 0
    for step in range(1, len(curve)):
        if curve[step] < share * curve[0]:
            break
        k = step
    return k


def order_statistic(values: list[float], q: float) -> float:
    """The smallest value with at least a share q of the values at or below it (the inverted-CDF percentile)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def interpolated(values: list[float], q: float) -> float:
    """The q quantile interpolated between the two nearest order statistics (numpy's 'linear' method)."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    below = math.floor(h)
    return ordered[below] + (h - below) * (ordered[min(below + 1, len(ordered) - 1)] - ordered[below])


def direct_draws(n_items: int, resamples: int, seed: int) -> np.ndarray:
    """The items each resample draws: n_items uniform picks with replacement from numpy's default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, n_items, size=(resamples, n_items))


def test_survival_equals_walking_each_curve() -> None:
    rng = np.random.default_rng(3)
    curves = np.concatenate([rng.uniform(0, 1, (200, 7)).cumsum(axis=1)[:, ::-1] / 7,  # falling curves
                             rng.integers(0, 3, (100, 7)) / 2.0])  # ties, zeros and a full score of 0
    for share in (0.5, 0.9, 1.0):
        want = [direct_survival(list(c), share) for c in curves]
        assert survival(curves, share).tolist() == want
    assert survival(np.array([1.0, 0.95, 0.89, 1.0]), 0.9) == 1
    assert survival(np.array([0.5, 0.5, 0.5]), 0.9) == 2  # still above at the last step: all steps
    assert survival(np.array([0.0, 0.4]), 0.9) == 0


def test_bands_equal_a_direct_bootstrap_and_cover_a_known_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = {p: (rng.uniform(size=(5, 37)) < np.linspace(0.9, 0.2, 5)[:, None] * f).astype(float)
              for p, f in (("likelihood", 1.0), ("generation", 0.7))}
    run = synthetic_run(tmp_path / "run", "knowledge", scores, depth=6)
    category_report([run], str(tmp_path / "report"), resamples=400, seed=11)
    rows = {r["protocol"]: r for r in csv.DictReader((tmp_path / "report" / "prune-categories.csv").open())}
    for protocol, given in scores.items():
        means = [[sum(given[step, i] for i in picks) / 37 for picks in direct_draws(37, 400, 11)] for step in range(5)]
        boot = bootstrap_curves(given, 400, seed=11)
        for step in range(5):  # each resample's mean at each step, the same items at every step
            assert boot[:, step] == pytest.approx(means[step])
        assert float(rows[protocol]["full_lo"]) == pytest.approx(interpolated(means[0], 0.025))
        assert float(rows[protocol]["full_hi"]) == pytest.approx(interpolated(means[0], 0.975))
    # coverage on data with a known answer: 95 % intervals over 60 Bernoulli(0.7) items hold 0.7 about 95 % of times
    covered = 0
    for trial in range(300):
        items = (np.random.default_rng(100 + trial).uniform(size=(1, 60)) < 0.7).astype(float)
        boot = bootstrap_curves(items, 500, seed=trial)[:, 0]
        covered += bool(np.quantile(boot, 0.025) <= 0.7 <= np.quantile(boot, 0.975))
    assert 0.88 <= covered / 300 <= 0.99


def test_category_items() -> None:
    knowledge = category_items("knowledge", 30, seed=1)
    assert len(knowledge) == 30 and all(it.hops == 1 and it.id.startswith("fact-") for it in knowledge)
    assert category_items("knowledge", 30, seed=1) == knowledge != category_items("knowledge", 30, seed=2)
    reasoning = category_items("reasoning", 9)
    assert [it.id.split("-")[0] for it in reasoning] == ["addition"] * 5 + ["chain"] * 4
    assert all(len(it.answer.split()) == 2 for it in category_items("coherence", 5))
    assert [it.meta["pairs"] for it in category_items("retrieval", 8)] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert parse_categories("coherence,retrieval", None) == ("retrieval", "coherence")
    assert parse_categories("all", "x.jsonl")[-1] == "gsm8k"
    with pytest.raises(DepthcacheError, match="unknown categor"):
        parse_categories("maths", None)
    with pytest.raises(DepthcacheError, match="needs --gsm8k"):
        parse_categories("gsm8k", None)


def test_gsm8k_style_file(tmp_path: Path) -> None:
    path = tmp_path / "word-problems.jsonl"
    path.write_text(json.dumps({"question": "Ann has 3 pens and buys 4. How many?", "answer": "3+4=7\n#### 7"})
                    + "\n\n" + json.dumps({"question": "Big?", "answer": "so #### 1,250"}) + "\n")
    first, second = gsm8k_items(path)
    assert first.prompt == "Question: Ann has 3 pens and buys 4. How many?\nAnswer:" and first.answer == " 7"
    assert second.answer == " 1250" and second.meta == {"line": 3}
    assert len(category_items("gsm8k", 5, gsm8k=str(path))) == 2
    path.write_text(json.dumps({"question": "No final number", "answer": "7"}) + "\n")
    with pytest.raises(DepthcacheError, match=r"line 1: .*'#### <number>'"):
        gsm8k_items(path)


def synthetic_run(folder: Path, category: str, scores: dict[str, np.ndarray], depth: int) -> str:
    """An evaluate-prune output folder of a category's items with the given per-item scores (steps × items)."""
    items = category_items(category, scores["likelihood"].shape[1])
    task = write_task_jsonl(items, folder / f"{category}.jsonl")
    steps = scores["likelihood"].shape[0]
    results = [{"gold_logprob": -np.ones(len(items)), "choice_correct": scores["likelihood"][k],
                "exact_match": scores["generation"][k], "generated": [""] * len(items),
                "removed_layer": depth - k if k else -1, "greedy_score": np.nan} for k in range(steps)]
    opts = PruneOptions(task=str(task), model="synthetic", order="last-first")
    ds = prune_dataset(results, items, np.zeros(depth), opts, ("likelihood", "generation"), tuple(range(depth)),
                       "cpu", "synthetic-model")
    write_outputs(ds, folder)
    return str(folder)


def test_report_rows_equal_direct_computations(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    runs, given = [], {}
    for category, rate in (("retrieval", 0.9), ("reasoning", 0.6)):
        drop = np.linspace(1, 0.3, 5)[:, None]
        scores = {p: (rng.uniform(size=(5, 24)) < rate * drop * f).astype(float)
                  for p, f in (("likelihood", 1.0), ("generation", 0.8))}
        given[category] = scores
        runs.append(synthetic_run(tmp_path / category, category, scores, depth=8))
    result = CliRunner().invoke(main, ["evaluate", "categories-report", *runs, "--out", str(tmp_path / "report"),
                                       "--resamples", "300", "--seed", "4"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "report" / "prune-categories.csv").open()))
    assert [(r["category"], r["protocol"]) for r in rows] == [
        ("retrieval", "generation"), ("retrieval", "likelihood"), ("reasoning", "generation"),
        ("reasoning", "likelihood")]
    for row in rows:
        scores = given[row["category"]][row["protocol"]]
        curve = scores.mean(axis=1)
        assert float(row["full"]) == pytest.approx(curve[0])
        assert int(row["can_lose"]) == direct_survival(list(curve), 0.9)
        lost = []
        for picks in direct_draws(24, 300, seed=4):  # the same resamples, each curve walked by hand
            lost.append(direct_survival([sum(scores[k, i] for i in picks) / 24 for k in range(5)], 0.9))
        assert int(row["can_lose_lo"]) == order_statistic(lost, 0.025)
        assert int(row["can_lose_hi"]) == order_statistic(lost, 0.975)
        assert float(row["full_lo"]) <= float(row["full"]) <= float(row["full_hi"])
    assert (tmp_path / "report" / "prune-categories.png").stat().st_size > 10_000
    assert "| synthetic-model (8 layers) | last-first | retrieval (24) |" in result.output
    bad = CliRunner().invoke(main, ["evaluate", "categories-report", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no prune.zarr here" in bad.output and "Traceback" not in bad.output


def test_categories_command_on_a_tiny_model(tiny_models, tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = CliRunner().invoke(main, ["evaluate", "categories", "--model", str(tiny_models["llama"]), "--categories",
                                       "retrieval,knowledge", "--n", "4", "--steps", "1", "--max-new-tokens", "2",
                                       "--device", "cpu", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    for category in ("retrieval", "knowledge"):
        assert load_task(out / category / f"{category}.jsonl") == category_items(category, 4)
        assert (out / category / "prune.zarr").is_dir() and not (out / category / "prune.partial").exists()
    text, paths = category_report([str(out / "retrieval"), str(out / "knowledge")], str(tmp_path / "r"), 200)
    assert text.count("\n") == 1 + 4 and all(p.exists() for p in paths)


def test_retrieval_works_everywhere_a_task_does(tiny_models, tmp_path: Path) -> None:
    """extract --data task:retrieval?…, erase --task retrieval, igrad --task retrieval and the lm-eval backend."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from depthcache.evaluate.harness import DepthcacheLM, write_harness_task
    from depthcache.locate.maps import read_map
    from depthcache.store.reader import open_dataset

    model = str(tiny_models["llama"])
    store = tmp_path / "retrieval.zarr"
    result = CliRunner().invoke(main, ["extract", "--model", model, "--data", "task:retrieval?n=3&max_pairs=8&seed=2",
                                       "--out", str(store), "--device", "cpu", "--seq-len", "256", "--no-progress"])
    assert result.exit_code == 0, result.output
    task = open_dataset(store).attrs["depthcache"]["dataset"]["task"]
    assert task == {"name": "retrieval", "n": 3, "seed": 2, "options": {"max_pairs": 8}}
    for command in ("erase", "igrad"):
        out = tmp_path / f"{command}.zarr"
        extra = ["--reference-windows", "1"] if command == "erase" else ["--steps", "8"]
        result = CliRunner().invoke(main, [command, "--model", model, "--task", "retrieval", "--n", "2", "--out",
                                           str(out), "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        assert list(read_map(out).item.values) == [it.id for it in load_task("retrieval", n=2)]
    names = write_harness_task("retrieval", tmp_path / "harness", n=2)
    assert names == ["retrieval_mc", "retrieval_gen", "retrieval_ll"]
    results = simple_evaluate(model=DepthcacheLM(pretrained=model, remove="1", device="cpu"), tasks=names,
                              task_manager=TaskManager(include_path=str(tmp_path / "harness"), include_defaults=False),
                              bootstrap_iters=0)
    assert 0 <= results["results"]["retrieval_mc"]["acc,none"] <= 1
    assert results["results"]["retrieval_ll"]["gold_logprob,none"] < 0
