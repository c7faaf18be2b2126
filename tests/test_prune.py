"""Pruning evaluation: removed layers, batched likelihood and greedy decoding vs direct computations, outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import xarray as xr
from click.testing import CliRunner
from conftest import save_tiny_model

from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.evaluate import PruneOptions, evaluate_prune
from depthcache.evaluate.encoding import SHARED_PREFIX_MIN, common_prefix, encode_continuation, encode_prompt
from depthcache.evaluate.generation import greedy, parse_answer
from depthcache.evaluate.influence import block_influence
from depthcache.evaluate.likelihood import batch_scores
from depthcache.evaluate.prune import Scorer
from depthcache.model.skips import only_layers
from depthcache.model.structure import decoder_layers, structure_of
from depthcache.tasks import TaskItem, load_task, write_task_jsonl

ITEMS = [
    TaskItem("fox", "The quick brown fox", " jumps", (" jumps", " over the lazy dog", " dog", " and")),
    TaskItem("res", "Residual streams carry information from", " layer to layer", (" layer", " layer to layer",
                                                                                     " the", " some punctuation")),
    TaskItem("num", "Numbers: 0 1 2 3", " 4", (" 4 5", " 4", " 9", " +")),
    TaskItem("lm", "Language models use their", " depth", ()),
]

FEW_SHOT = "Q: What is two plus two? A: four\nQ: What is one plus two? A: three\nQ: "  # a shared prompt prefix
SHARED = [TaskItem(f"s{i}", FEW_SHOT + q, a, c) for i, (q, a, c) in enumerate((
    ("What is one plus one? A:", " two", (" two", " three", " one")),
    ("What is three plus one? A:", " four", (" five", " four")),
    ("Is it done? A:", " yes", ()),
    ("What is two plus three and then some more? A:", " five", (" five", " six", " seven", " four"))))]


def load(model_dir: Path) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A tiny model in eval mode and its tokenizer."""
    return (transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval(),
            transformers.AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_removed_layers_equal_a_model_with_those_layers_deleted(arch, tiny_models) -> None:
    model, _ = load(tiny_models[arch])
    spec = structure_of(model)
    deleted, _ = load(tiny_models[arch])
    blocks = decoder_layers(deleted, structure_of(deleted))
    del blocks[2]
    del blocks[0]
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        want = deleted(ids).logits
        with only_layers(model, spec, [1, 3]):
            got = model(ids).logits
            # the KV cache works with renumbered layers (layer 0 removed): cached greedy = full recompute
            cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
            full = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
        restored = model(ids).logits
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(cached, full)
    assert len(decoder_layers(model, spec)) == 4 and not torch.allclose(restored, want)


@pytest.mark.parametrize("arch,items", [("llama", ITEMS), ("gpt2", ITEMS), ("llama", SHARED), ("gpt2", SHARED),
                                        ("gpt_neox", SHARED)])
def test_batched_likelihood_equals_one_forward_per_candidate(arch, items, tiny_models) -> None:
    """Batched scoring (with a shared few-shot prefix run once for SHARED) equals one whole forward per candidate."""
    model, tok = load(tiny_models[arch])
    if items is SHARED:
        assert common_prefix([encode_prompt(tok, it.prompt) for it in items]) >= SHARED_PREFIX_MIN
    scores = batch_scores(model, tok, items, "cpu")
    for item, got in zip(items, scores):
        prompt = encode_prompt(tok, item.prompt)
        for choice, value in zip(item.choices or (item.answer,), got):
            cont = encode_continuation(tok, item.prompt, choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].double(), -1)
            want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))
            assert value == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("items", [ITEMS, SHARED])
def test_greedy_decoding_equals_unbatched_argmax(items, tiny_models) -> None:
    model, tok = load(tiny_models["qwen3"])
    prompts = [it.prompt for it in items]
    got = greedy(model, tok, prompts, [3] * len(prompts), 6, "cpu")
    for prompt, text in zip(prompts, got):
        ids = encode_prompt(tok, prompt)
        new: list[int] = []
        for _ in range(6):
            with torch.no_grad():
                new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
            decoded = tok.decode(new)
            if "\n" in decoded or len(decoded.split()) > 3:
                break
        assert text == tok.decode(new, skip_special_tokens=True).split("\n")[0]


def test_parse_answer() -> None:
    assert parse_answer(" Paris. It is the capital", " Paris") == "paris"
    assert parse_answer(" 109\nWhat is", " 109") == "109"
    assert parse_answer(" the next few words here", " the next few") == "the next few"
    assert parse_answer("\n 42", " 42") == ""


def test_block_influence_matches_hidden_states(tiny_models) -> None:
    model, tok = load(tiny_models["llama"])
    texts = [it.prompt for it in ITEMS]
    got = block_influence(model, structure_of(model), tok, texts, 3, "cpu")
    total, count = np.zeros(4), 0
    for text in texts:
        with torch.no_grad():
            out = model.model(torch.tensor([encode_prompt(tok, text)]), output_hidden_states=True)
        hidden = list(out.hidden_states[:4])
        with torch.no_grad():  # the last entry is after the final norm: rebuild h_L from the last layer's output
            hidden.append(model.model.layers[3](hidden[3], position_embeddings=model.model.rotary_emb(
                hidden[3], torch.arange(hidden[3].shape[1])[None])))
        for layer in range(4):
            total[layer] += torch.nn.functional.cosine_similarity(hidden[layer][0], hidden[layer + 1][0], -1).sum()
        count += hidden[0].shape[1]
    np.testing.assert_allclose(got, 1 - total / count, rtol=1e-5, atol=1e-6)


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    """The tiny task as a .jsonl task file."""
    return write_task_jsonl(ITEMS, tmp_path / "tiny.jsonl")


@pytest.mark.parametrize("order", ["last-first", "influence", "greedy"])
def test_prune_evaluation_outputs(order, tiny_models, task_file, tmp_path) -> None:
    out = tmp_path / "prune"
    ds = evaluate_prune(PruneOptions(task=str(task_file), model=str(tiny_models["llama"]), layers="1-3", n=None,
                                     order=order, max_new_tokens=4, batch_size=3, device="cpu", out=str(out)))
    assert ds.sizes == {"step": 4, "item": 4, "layer": 4}
    assert ds.attrs["model"] == tiny_models["llama"].name  # the display name the figure's title uses
    removed = list(ds.removed_layer.values)
    assert removed[0] == -1 and sorted(removed[1:]) == [1, 2, 3]
    if order == "last-first":
        assert removed[1:] == [3, 2, 1]
    if order == "influence":
        assert removed[1:] == sorted([1, 2, 3], key=lambda layer: ds.block_influence.values[layer])
    if order == "greedy":  # each step keeps the best mean gold log-prob among the candidates left
        model, tok = load(tiny_models["llama"])
        scorer = Scorer(type("Loaded", (), {"model": model, "tokenizer": tok})(), structure_of(model), ITEMS,
                        PruneOptions(task="", batch_size=3), "cpu")
        first = {layer: scorer.mean_logprob([layer]) for layer in (1, 2, 3)}
        assert removed[1] == max(first, key=first.get)
        assert ds.greedy_score.values[1] == pytest.approx(first[removed[1]])
    np.testing.assert_allclose(ds.mean_gold_logprob.values, ds.gold_logprob.values.mean(1))
    np.testing.assert_allclose(ds.choice_accuracy.values, ds.choice_correct.values[:, :3].mean(1))
    assert np.isnan(ds.choice_correct.values[:, 3]).all()  # the item without choices has no accuracy
    assert {p.name for p in out.iterdir()} == {"prune.zarr", "prune.csv", "prune-items.csv", "prune.png"}
    assert len((out / "prune.csv").read_text().splitlines()) == 5


def test_prune_cli_and_bad_input_write_nothing(tiny_models, task_file, tmp_path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["evaluate", "prune", "--model", str(tiny_models["gpt2"]), "--task",
                                       str(task_file), "--layers", "3", "--metric", "generation", "--device", "cpu",
                                       "--out", str(out), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "exact_match_rate" in result.output and (out / "prune.png").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": " b"}\n{"prompt": "c", "answer": \n')
    for args, message in (([ "--task", str(bad)], "bad.jsonl, line 2: not valid JSON"),
                          (["--task", str(task_file), "--metric", "accuracy"], "unknown metric"),
                          (["--task", str(task_file), "--layers", "2-9"], "out of range")):
        result = CliRunner().invoke(main, ["evaluate", "prune", "--model", str(tiny_models["gpt2"]), "--device",
                                           "cpu", "--out", str(tmp_path / "nothing"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(DepthcacheError, match="unknown --order"):
        evaluate_prune(PruneOptions(task=str(task_file), order="random"))


@pytest.mark.slow
def test_smollm2_generation_breaks_before_likelihood_when_late_layers_go() -> None:
    """On two-hop facts, removing SmolLM2's last 4 layers costs exact match far more than choice accuracy."""
    from depthcache.model.loading import load_model

    loaded = load_model("smollm2-135m")
    items = load_task("two-hop-facts", n=8)
    scorer = Scorer(loaded, structure_of(loaded.model), items, PruneOptions(task="two-hop-facts"), "cpu")
    accuracy, match = [], []
    for removed in ([], [26, 27, 28, 29]):
        accuracy.append(np.nanmean(scorer.likelihood(removed)[1]))
        match.append(scorer.generation(removed)[0].mean())
    assert match[0] >= 0.25 and accuracy[0] >= 0.6  # the whole model knows many of these facts
    assert match[0] - match[1] > accuracy[0] - accuracy[1] + 0.1


def test_compare_pruning_puts_runs_of_different_depths_on_relative_depth(tiny_models, task_file,
                                                                        tmp_path: Path) -> None:
    """Two models (4 and 6 layers), two orders: the table's scores and survival counts equal each run's own values,
    the figure's x axis is k / L, and a folder that is not a run gives one line."""
    from depthcache.evaluate.compare import open_run, survives

    deep = save_tiny_model("llama", tmp_path / "llama6", n_layers=6)
    folders = []
    for name, model, order in (("a", tiny_models["llama"], "last-first"), ("b", deep, "influence")):
        folders.append(str(tmp_path / name))
        evaluate_prune(PruneOptions(task=str(task_file), model=str(model), n=None, order=order, max_new_tokens=4,
                                    batch_size=3, device="cpu", out=folders[-1]))
    result = CliRunner().invoke(main, ["evaluate", "compare", *folders, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "cmp" / "prune-compare.csv").open()))
    assert [(r["layers"], r["order"]) for r in rows] == [("4", "last-first"), ("6", "influence")]
    for row, folder, depth in zip(rows, folders, (4, 6)):
        ds = xr.open_zarr(Path(folder) / "prune.zarr", consolidated=False)
        for name in ("choice_accuracy", "exact_match_rate"):
            scores = ds[name].values
            assert float(row[f"{name}_full"]) == pytest.approx(scores[0])
            k = int(row[f"{name}_survives"])
            # survival: every step up to k keeps half the full score, step k + 1 (if any) does not
            assert all(s >= 0.5 * scores[0] for s in scores[:k + 1]) or scores[0] <= 0
            assert k == len(scores) - 1 or not scores[k + 1] >= 0.5 * scores[0] or scores[0] <= 0
            assert float(row[f"{name}_survives_fraction"]) == pytest.approx(k / depth)
        assert open_run(folder).depth == depth
    assert (tmp_path / "cmp" / "prune-compare.png").stat().st_size > 10_000
    assert "| model | layers | order |" in result.output
    assert survives(np.array([0.8, 0.6, 0.39, 0.5])) == 1 and survives(np.array([0.0, 0.0])) == 0
    bad = CliRunner().invoke(main, ["evaluate", "compare", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "no prune.zarr here" in bad.output and "Traceback" not in bad.output
    assert len([line for line in bad.output.splitlines() if line.strip()]) == 1
