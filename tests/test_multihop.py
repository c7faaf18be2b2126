"""Task stores (schema 1.2) and the multihop analysis against a direct numpy/torch computation, plus bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from depthcache.analyze import plot, run
from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.skip_runs import SkipOptions, extract_skips
from depthcache.store.io import open_group, read_attrs, write_attrs
from depthcache.store.layout import SCHEMA_VERSION
from depthcache.store.reader import open_dataset
from depthcache.store.schema import validate_store

ITEMS = [  # prompt + answer split at a space, so the answer's tokens continue the prompt's
    {"id": "a", "prompt": "The quick brown fox", "answer": " jumps over", "hops": 1},
    {"id": "e", "prompt": "Residual streams carry", "answer": " information", "hops": 1},
    {"id": "b", "prompt": "Numbers: 0 1 2", "answer": " 3 4 5", "hops": 2, "meta": {"hop_ids": ["a", "e"]}},
    {"id": "c", "prompt": "Language models use their", "answer": " depth", "hops": 3,
     "meta": {"hop_ids": ["a", "b"]}},
    {"id": "d", "prompt": "some layers matter", "answer": " more.", "hops": 2, "meta": {"hop_ids": ["e"]}},
    {"id": "f", "prompt": "The lazy", "answer": " dog", "hops": 1},
]


def options(out: Path, model: Path, data: str, **kw: object) -> ExtractOptions:
    """Small float32 extraction options on the CPU (chunks of 16 tokens, so items cross chunk boundaries)."""
    return ExtractOptions(out=str(out), model=str(model), data=data, **({"dtype": "float32", "seq_len": 32,
                          "batch_size": 2, "chunk_tokens": 16, "progress": False, "device": "cpu"} | kw))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL task file with 1-, 2- and 3-hop items, some naming their single hops."""
    path = tmp_path_factory.mktemp("task") / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


@pytest.fixture(scope="module")
def store(tiny_models, task_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 task store of the tiny Llama (BOS tokenizer) with current-variant skip runs of every layer."""
    opts = options(tmp_path_factory.mktemp("hops") / "hops.zarr", tiny_models["llama"], f"task:{task_file}")
    extract_skips(opts, SkipOptions("each", tokens=None))
    return Path(opts.out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # with and without BOS
def test_task_windows_one_per_item(arch: str, tiny_models, task_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.zarr"
    extract(options(out, tiny_models[arch], f"task:{task_file}"))
    ds = open_dataset(out).load()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_models[arch])
    bos = [tok.bos_token_id] if arch == "llama" else []
    seq = ds.seq_id.values
    assert np.array_equal(ds.item.values, seq) and np.array_equal(ds.doc_id.values, seq)
    assert sorted(set(seq)) == list(range(len(ITEMS)))
    for i, item in enumerate(ITEMS):
        prompt = tok(item["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(item["answer"], add_special_tokens=False)["input_ids"]
        rows = seq == i
        assert ds.token_id.values[rows].tolist() == bos + prompt + answer
        assert np.array_equal(ds.position.values[rows], np.arange(rows.sum()))
        start = len(bos) + len(prompt)  # index of the first answer token in the window
        expected = [p + 1 - start if start <= p + 1 < rows.sum() else -1 for p in range(rows.sum())]
        assert ds.answer_index.values[rows].tolist() == expected
        nxt = ds.next_token_id.values[rows][ds.answer_index.values[rows] >= 0]
        assert nxt.tolist() == answer
        assert set(ds.hops.values[rows]) == {item["hops"]}
    res = [ds.resid_pre.values[layer] for layer in range(ds.sizes["layer"])] + [ds.resid_final.values]
    for layer in range(ds.sizes["layer"]):  # the engine's residual identity still holds (float32, sequential)
        np.testing.assert_allclose(res[layer] + ds.attn_out.values[layer] + ds.mlp_out.values[layer], res[layer + 1],
                                   rtol=1e-5, atol=1e-5)
    attrs = ds.attrs["depthcache"]
    assert attrs["schema_version"] == SCHEMA_VERSION == "2.3"
    assert attrs["dataset"]["task"] == {"name": str(task_file), "n": None, "seed": 0, "options": {}}
    assert [it["id"] for it in attrs["dataset"]["items"]] == [it["id"] for it in ITEMS]
    assert attrs["dataset"]["items"][2]["meta"] == {"hop_ids": ["a", "e"]}
    assert validate_store(str(out)) == []


def test_task_store_resumes_bit_identically(tiny_models, tmp_path: Path) -> None:
    out = tmp_path / "chain.zarr"
    opts = options(out, tiny_models["qwen2"], "task:arithmetic-chain?n=6&max_ops=2&seed=3", seq_len=48)
    extract(opts)
    full = open_dataset(out).load()
    group = open_group(out, "r+")
    attrs = read_attrs(group)
    attrs["progress"] = {"tokens_committed": 32, "complete": False}  # as if killed after two chunks
    write_attrs(group, attrs)
    group["resid_pre"][:, 32:] = 0
    group["answer_index"][32:] = 0
    extract(replace(opts, resume=True))
    resumed = open_dataset(out).load()
    for name in ("resid_pre", "item", "answer_index", "hops", "next_logprob"):
        np.testing.assert_array_equal(resumed[name].values, full[name].values)
    task = resumed.attrs["depthcache"]["dataset"]["task"]
    assert task == {"name": "arithmetic-chain", "n": 6, "seed": 3, "options": {"max_ops": 2}}
    assert sorted(set(resumed.hops.values)) == [1, 2]
    with pytest.raises(DepthcacheError, match="already exists"):
        extract(opts)


def lm(model_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Residual → log-probabilities through the tiny model's own final norm and head, in float64."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double().eval()

    def logprobs(h: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(model.lm_head(model.model.norm(torch.tensor(h, dtype=torch.float64))), -1).numpy()
    return logprobs


def reference(store: Path, model_dir: Path) -> dict[str, np.ndarray]:
    """The multihop quantities computed directly from the whole arrays, in float64, per item with a loop."""
    base = open_dataset(store).load()
    logprobs = lm(model_dir)
    n_layers = base.sizes["layer"]
    runs = [open_dataset(store, group=f"runs/skip_{s}").load() for s in range(n_layers)]
    ans, nxt = base.answer_index.values, base.next_token_id.values
    out: dict[str, list] = {k: [] for k in ("rank", "prob", "correct", "e_lp", "e_l2")}
    for i in range(len(ITEMS)):
        rows = np.flatnonzero((base.item.values == i) & (ans >= 0))
        first = rows[ans[rows] == 0][0]
        hs = np.concatenate([base.resid_pre.values[:, first], base.resid_final.values[first][None]]).astype(np.float64)
        lp = logprobs(hs)
        gold = nxt[first]
        out["rank"].append((lp > lp[:, gold:gold + 1]).sum(axis=1))
        out["prob"].append(np.exp(lp[:, gold]))
        out["correct"].append(bool((base.topk_ids.values[rows, 0] == nxt[rows]).all()))
        p_base = np.exp(logprobs(base.resid_final.values[rows].astype(np.float64)))
        out["e_lp"].append([np.abs(r.next_logprob.values[rows] - base.next_logprob.values[rows]).mean() for r in runs])
        out["e_l2"].append([np.linalg.norm(np.exp(logprobs(r.resid_final.values[rows].astype(np.float64))) - p_base,
                                           axis=1).mean() for r in runs])
    ref = {k: np.array(v) for k, v in out.items()}
    depth = np.arange(n_layers) / n_layers
    ref["score"] = (ref["e_lp"] * depth).sum(1) / ref["e_lp"].sum(1)
    ref["score_l2"] = (ref["e_l2"] * depth).sum(1) / ref["e_l2"].sum(1)
    hit = ref["rank"] == 0
    ref["formation"] = np.array([np.flatnonzero(h)[0] / n_layers if h.any() else np.nan for h in hit])
    return ref


def test_multihop_matches_direct_computation(store: Path, tiny_models) -> None:
    result = run("multihop", str(store), force=True)
    ref = reference(store, tiny_models["llama"])
    np.testing.assert_array_equal(result.answer_rank.values, ref["rank"])  # exact: no logit ties within 1e-5 here
    np.testing.assert_allclose(result.answer_prob.values, ref["prob"], rtol=1e-4, atol=1e-9)  # float32 vs float64
    np.testing.assert_allclose(result.formation_depth.values, ref["formation"], equal_nan=True)
    np.testing.assert_array_equal(result.correct.values, ref["correct"])
    np.testing.assert_allclose(result.effect_logprob.values, ref["e_lp"], rtol=1e-6, atol=1e-7)  # stored values
    np.testing.assert_allclose(result.effect_l2.values, ref["e_l2"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.depth_score.values, ref["score"], rtol=1e-6)
    np.testing.assert_allclose(result.depth_score_l2.values, ref["score_l2"], rtol=1e-4)
    ids = [it["id"] for it in ITEMS]
    hops_ok = [all(ref["correct"][ids.index(h)] for h in it.get("meta", {}).get("hop_ids", [])) for it in ITEMS]
    np.testing.assert_array_equal(result.hops_correct.values, hops_ok)
    np.testing.assert_array_equal(result.included.values, hops_ok)  # hop_ids present → only_correct_hops by default
    hops = np.array([it["hops"] for it in ITEMS])
    for g, h in enumerate(result.hops.values):
        keep = (hops == h) & np.array(hops_ok)
        assert result.n_included.values[g] == keep.sum()
        if keep.any():
            np.testing.assert_allclose(result.depth_score_mean.values[g], ref["score"][keep].mean(), rtol=1e-6)
            np.testing.assert_allclose(result.depth_score_std.values[g], ref["score"][keep].std(), atol=1e-9)
    every = run("multihop", str(store), only_correct_hops=False)
    assert every.included.values.all()
    np.testing.assert_allclose(every.depth_score_mean.values, [ref["score"][hops == h].mean() for h in (1, 2, 3)],
                               rtol=1e-6)
    assert result.relative_depth.values[-1] == 1.0 and list(result.layer.values) == [0, 1, 2, 3, 4]


def test_multihop_plot(store: Path, tmp_path: Path) -> None:
    paths = plot("multihop", str(store), out_dir=str(tmp_path))
    assert [p.name for p in paths] == ["multihop.png"] and paths[0].stat().st_size > 10_000


def test_skip_runs_on_task_store_store_the_task_arrays(store: Path) -> None:
    base = open_dataset(store)
    skip = open_dataset(store, group="runs/skip_2")
    np.testing.assert_array_equal(skip.answer_index.values, base.answer_index.values)
    np.testing.assert_array_equal(skip.item.values, base.item.values)
    assert validate_store(str(store)) == []


@pytest.mark.parametrize("data, lines, seq_len, message", [
    ("task:{file}", ['{"prompt": "The quick brown fox", "answer": " jumps over the lazy dog."}'], 8,
     "longer than --seq-len 8"),
    ("task:no-such-task", [], 32, "unknown task 'no-such-task'"),
    ("task:{file}", ['{"prompt": "The quick", "answer": " brown"}', '{"prompt": "broken'], 32,
     r"items.jsonl, line 2: not valid JSON"),
    ("task:{file}", ['{"id": "split", "prompt": "The quick brown fo", "answer": "x jumps"}'], 32,
     "'split'.*not a\\s+token continuation"),
    ("task:arithmetic-chain?n=4&max_ops", [], 32, "bad task option 'max_ops'"),
    ("task:arithmetic-chain?n=4&colour=red", [], 32, "has no option 'colour'"),
])
def test_bad_task_input_writes_nothing(data: str, lines: list[str], seq_len: int, message: str, tiny_models,
                                       tmp_path: Path) -> None:
    file = tmp_path / "items.jsonl"
    file.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "bad.zarr"
    with pytest.raises(DepthcacheError, match=message):
        extract_skips(options(out, tiny_models["llama"], data.format(file=file), seq_len=seq_len), SkipOptions("each"))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["items.jsonl"]


def test_cli_task_errors_are_one_line(tiny_models, tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    result = CliRunner().invoke(main, ["extract", "--model", str(tiny_models["llama"]), "--data", "task:nope",
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.startswith("error: unknown task 'nope'")
    assert "Traceback" not in result.output and not out.exists()


def test_multihop_refuses_a_text_store(tiny_models, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "text.zarr"
    extract(options(out, tiny_models["llama"], str(text_file), max_tokens=64))
    with pytest.raises(DepthcacheError, match="not a task store: extract one with --data task:NAME"):
        run("multihop", str(out))


def plain_skip_effects(model: torch.nn.Module, ids: list[int], t: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's future-token skip effects written out in float64: layer s's output is set back to its input at
    positions 1..t−1 (a plain forward hook), d_l = h_{l+1} − h_l from output_hidden_states (h_L: the final norm's
    input), effects = max over positions ≥ t of ‖Δd_l‖ / max(‖d_l‖, 1e-6) and of ‖Δ softmax‖₂."""
    depth = len(model.model.layers)

    def run(skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        def back(module, args, kwargs, out):  # noqa: ANN001, ANN202 - torch hook
            given = args[0] if args else kwargs["hidden_states"]
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[:, 1:t] = given[:, 1:t]
            return (h, *out[1:]) if isinstance(out, tuple) else h
        final: list[torch.Tensor] = []
        handles = [model.model.norm.register_forward_pre_hook(lambda m, a: final.append(a[0]))]
        if skip is not None:
            handles.append(model.model.layers[skip].register_forward_hook(back, with_kwargs=True))
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        for handle in handles:
            handle.remove()
        hs = [*out.hidden_states[:-1], final[0]]
        return torch.stack([hs[i + 1][0] - hs[i][0] for i in range(depth)]), torch.softmax(out.logits[0], -1)
    base_d, base_p = run(None)
    effect, output = np.zeros((depth, depth)), np.zeros(depth)
    for s in range(depth):
        d, p = run(s)
        effect[s] = ((d - base_d)[:, t:].norm(dim=-1) / base_d[:, t:].norm(dim=-1).clamp(min=1e-6)).amax(-1).numpy()
        output[s] = (p - base_p)[t:].norm(dim=-1).max().item()
    return effect, output


def test_hop_depth_matches_plain_torch(tiny_models, task_file: Path, tmp_path: Path) -> None:
    """`hop-depth` (the paper's multi-hop measure): per item the skip effects equal plain float64 forwards with the
    layer's output set back to its input at the prompt's positions; per hop count the max over items, the later-layer
    profile Σ_l / max(L − 1 − s, 1), the output profile and their centres of mass equal numpy's; the plot draws."""
    out = tmp_path / "hops.zarr"
    result = CliRunner().invoke(main, ["hop-depth", "--model", str(tiny_models["llama"]), "--task", str(task_file),
                                       "--out", str(out), "--device", "cpu", "--per-hops", "2", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    from depthcache.locate import read_map

    ds = read_map(out)
    kept = [it for it in ITEMS if it["hops"] == 1][:2] + [it for it in ITEMS if it["hops"] > 1]
    assert list(ds.item.values) == [it["id"] for it in ITEMS if it in kept]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).double().eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_models["llama"])
    effects, outputs = [], []
    for item_id in ds.item.values:
        item = next(it for it in ITEMS if it["id"] == item_id)
        prompt = tok(item["prompt"], add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id, *tok(item["prompt"] + item["answer"], add_special_tokens=False)["input_ids"]]
        assert ds.first_answer_position.sel(item=item_id).item() == 1 + len(prompt)
        effect, output = plain_skip_effects(model, ids, 1 + len(prompt))
        np.testing.assert_allclose(ds.layer_effect.sel(item=item_id).values, effect, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ds.output_l2.sel(item=item_id).values, output, rtol=1e-4, atol=1e-7)
        effects.append(effect)
        outputs.append(output)
    effects, outputs, hops = np.array(effects), np.array(outputs), ds.item_hops.values
    depth = effects.shape[-1]
    for g, h in enumerate(ds.hops.values):
        worst = effects[hops == h].max(0)
        later = np.array([worst[s].sum() / max(depth - 1 - s, 1) for s in range(depth)])
        np.testing.assert_allclose(ds.later_effect_max.values[g], later, rtol=1e-4, atol=1e-6)
        score = (np.arange(depth) * later).sum() / later.sum() / depth
        assert ds.depth_score_later_max.values[g] == pytest.approx(score, rel=1e-4)
        top = outputs[hops == h].max(0)
        assert ds.depth_score_output_max.values[g] == pytest.approx((np.arange(depth) * top).sum() / top.sum() / depth,
                                                                     rel=1e-4)
        mean = effects[hops == h].mean(0).sum(-1) / np.maximum(depth - 1 - np.arange(depth), 1)
        np.testing.assert_allclose(ds.later_effect_mean.values[g], mean, rtol=1e-4, atol=1e-6)
    assert effects[:, :, 0].max() == 0 and effects.max() > 0.01  # l ≤ s unchanged; the test can fail
    assert "2 hops" in result.output and ds.attrs["depthcache_map"]["kind"] == "hop-depth"
    plotted = CliRunner().invoke(main, ["plot", "hop-depth", str(out), "--out", str(tmp_path / "plots")])
    assert plotted.exit_code == 0 and (tmp_path / "plots" / "hop-depth.png").stat().st_size > 10_000, plotted.output
