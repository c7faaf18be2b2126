"""The lm-evaluation-harness backend ``depthcache``: its scores of a tiny random model with layers removed equal a
direct computation, evaluate prune --harness agrees with the own loop, and the lm_eval command line finds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from conftest import save_tiny_model

from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.evaluate import PruneOptions, evaluate_prune
from depthcache.evaluate.harness import DepthcacheLM, parse_remove, write_harness_task
from depthcache.tasks import load_task, write_task_jsonl

REMOVED = (1, 2)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm-eval" / "two-hop-facts"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama-style model, a 4-item two-hop task file and its exported harness tasks."""
    root = tmp_path_factory.mktemp("harness")
    model = save_tiny_model("llama", root / "llama")
    items = load_task("two-hop-facts", n=1)[:4]
    task = write_task_jsonl(items, root / "two-hop-mini.jsonl")
    names = write_harness_task(str(task), root / "tasks")
    assert names == ["two_hop_mini_mc", "two_hop_mini_gen", "two_hop_mini_ll"]
    return {"model": model, "task": task, "tasks": root / "tasks"}


def pruned_double(folder: Path) -> torch.nn.Module:
    """The model with REMOVED deleted by hand, in float64: the independent reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).double().eval()
    model.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(model.model.layers) if i not in REMOVED)
    return model


def direct_logprob(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:  # noqa: ANN001
    """log p(continuation | context) summed over the continuation's tokens (of the joint tokenization)."""
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full]), use_cache=False).logits[0], -1)
    return float(sum(logp[p - 1, full[p]] for p in range(len(ctx), len(full))))


def direct_greedy(model: torch.nn.Module, tokenizer, prompt: str, steps: int = 16) -> str:  # noqa: ANN001
    """Greedy continuation without a KV cache, up to a newline, EOS or ``steps`` tokens."""
    ids, new = tokenizer(prompt)["input_ids"], []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new]), use_cache=False).logits[0, -1].argmax())
        new.append(token)
        if token == tokenizer.eos_token_id or "\n" in tokenizer.decode(new, skip_special_tokens=True):
            break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]


def test_harness_scores_equal_a_direct_computation(setup: dict[str, Path]) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = DepthcacheLM(pretrained=str(setup["model"]), remove="1+2", device="cpu", batch_size=3)
    assert lm.removed == REMOVED
    results = simple_evaluate(model=lm, tasks=["two_hop_mini_mc", "two_hop_mini_gen", "two_hop_mini_ll"],
                              task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
                              log_samples=True, bootstrap_iters=0)
    reference, tokenizer = pruned_double(setup["model"]), transformers.AutoTokenizer.from_pretrained(setup["model"])
    items = load_task(str(setup["task"]))
    mc = {s["doc"]["id"]: s for s in results["samples"]["two_hop_mini_mc"]}
    ll = {s["doc"]["id"]: s for s in results["samples"]["two_hop_mini_ll"]}
    gen = {s["doc"]["id"]: s for s in results["samples"]["two_hop_mini_gen"]}
    correct, golds, matches = [], [], []
    for item in items:
        direct = np.array([direct_logprob(reference, tokenizer, item.prompt, c) for c in item.choices])
        harness = np.array([r[0][0] for r in mc[item.id]["resps"]])
        np.testing.assert_allclose(harness, direct, rtol=1e-4, atol=1e-4)
        correct.append(float(np.argmax(direct) == item.choices.index(item.answer)))
        gold = direct_logprob(reference, tokenizer, item.prompt, item.answer)
        np.testing.assert_allclose(ll[item.id]["resps"][0][0][0], gold, rtol=1e-4, atol=1e-4)
        golds.append(gold)
        text = direct_greedy(reference, tokenizer, item.prompt)
        assert gen[item.id]["resps"][0][0].split("\n")[0] == text
        matches.append(float(text.strip().casefold() == item.answer.strip().casefold()))
    assert results["results"]["two_hop_mini_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    assert results["results"]["two_hop_mini_ll"]["gold_logprob,none"] == pytest.approx(np.mean(golds), rel=1e-4)
    assert results["results"]["two_hop_mini_gen"]["exact_match,none"] == pytest.approx(np.mean(matches))
    assert len(lm.loaded.model.model.layers) == 4, "the model is whole again after the harness ran"


def test_prune_through_the_harness_agrees_with_the_own_loop(setup: dict[str, Path], tmp_path: Path) -> None:
    common = dict(model=str(setup["model"]), layers="1-3", steps=1, device="cpu", batch_size=4, n=None)
    own = evaluate_prune(PruneOptions(task=str(setup["task"]), **common))
    tasks = f"{setup['tasks'] / 'two_hop_mini_mc.yaml'},two_hop_mini_gen,two_hop_mini_ll"
    harness = evaluate_prune(PruneOptions(harness=tasks, include_path=str(setup["tasks"]), out=str(tmp_path),
                                          **common))
    assert harness.removed_layer.values.tolist() == own.removed_layer.values.tolist() == [-1, 3]
    np.testing.assert_array_equal(harness["two_hop_mini_mc.acc"].values, own.choice_accuracy.values)
    np.testing.assert_array_equal(harness["two_hop_mini_gen.exact_match"].values, own.exact_match_rate.values)
    np.testing.assert_allclose(harness["two_hop_mini_ll.gold_logprob"].values, own.mean_gold_logprob.values,
                               rtol=1e-4)
    assert (tmp_path / "prune-harness.csv").is_file() and (tmp_path / "prune-harness.zarr").is_dir()
    with pytest.raises(DepthcacheError, match="--task too"):
        evaluate_prune(PruneOptions(harness="two_hop_mini_mc", order="greedy", **common))


def test_lm_eval_command_line_finds_the_depthcache_backend(setup: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import lm_eval.tasks

    # lm_eval's command line indexes its ~200 built-in task folders (a minute and more here); only ours are needed
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    result = CliRunner().invoke(main, ["lm-eval", "--model", "depthcache", "--model_args",
                                       f"pretrained={setup['model']},remove=1+2", "--tasks", "two_hop_mini_mc",
                                       "--include_path", str(setup["tasks"]), "--device", "cpu", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "two_hop_mini_mc" in result.output and "acc" in result.output
    assert parse_remove("20-22+25", 30) == (20, 21, 22, 25) and parse_remove(None, 30) == ()


def test_shipped_example_task_is_the_exported_built_in_task(tmp_path: Path) -> None:
    names = write_harness_task("two-hop-facts", tmp_path)
    assert sorted(p.name for p in EXAMPLE.iterdir() if p.is_file()) == sorted(p.name for p in tmp_path.iterdir())
    for path in tmp_path.iterdir():
        assert (EXAMPLE / path.name).read_text() == path.read_text(), f"regenerate {EXAMPLE}/{path.name}"
    assert names == ["two_hop_facts_mc", "two_hop_facts_gen", "two_hop_facts_ll"]
