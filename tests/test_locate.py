"""Location maps: residual erasure and integrated gradients on tiny random models (float32), checked against
direct computations (manual last layer + norm + unembedding, full forwards with replacement hooks, numpy means)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.locate import LocateOptions, is_map, locate, read_map
from depthcache.locate.erasure import erase_layer, erasure_map
from depthcache.locate.igrad import igrad_map, integrate_path, left_riemann
from depthcache.locate.maps import encode
from depthcache.locate.reference import sequence_mean, store_mean
from depthcache.model.loading import load_model
from depthcache.model.restart import answer_probs, clean_run
from depthcache.model.structure import decoder_layers, structure_of

PROMPT, ANSWER = "The quick brown", " fox jumps"


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]):  # noqa: ANN201 - LoadedModel
    """The tiny Llama, loaded once."""
    return load_model(str(tiny_models["llama"]))


def prompt_of(loaded):  # noqa: ANN001, ANN201 - LoadedModel → Prompt
    """The test prompt encoded for ``loaded``."""
    return encode(loaded.tokenizer, PROMPT, ANSWER, 256)


def hooked_probs(model: torch.nn.Module, prompt, layer: int, replace) -> torch.Tensor:  # noqa: ANN001
    """Answer probabilities of a FULL forward whose residual entering ``layer`` is rewritten by ``replace``."""
    def hook(module, args, kwargs):  # noqa: ANN001, ANN202 - torch hook
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        replace(hidden)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
    block = decoder_layers(model, structure_of(model))[layer]
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt.input_ids]), use_cache=False).logits
    finally:
        handle.remove()
    return answer_probs(logits, prompt)[0]


def test_encode_marks_prompt_and_answer(llama) -> None:
    """Input = BOS + prompt + answer minus its last token; answer tokens are the joint tokenization's tail."""
    p = prompt_of(llama)
    joint = llama.tokenizer(PROMPT + ANSWER, add_special_tokens=False)["input_ids"]
    alone = llama.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert p.input_ids == (llama.tokenizer.bos_token_id, *joint[:-1])
    assert p.answer_ids == tuple(joint[len(alone):]) and p.n_prompt == 1 + len(alone)
    assert p.labels[0] == "<s>" and "".join(p.answer_labels) == ANSWER


def test_bad_prompts_are_refused(llama) -> None:
    """An answer that merges with the prompt's last token, or a prompt longer than the context: clear errors."""
    with pytest.raises(DepthcacheError, match="not a token continuation"):
        encode(llama.tokenizer, "The quic", "k", 256)
    with pytest.raises(DepthcacheError, match="context is 256"):
        encode(llama.tokenizer, "fox " * 300, " fox", 256)


def test_last_layer_erasure_matches_direct_computation(llama) -> None:
    """Erasing a cell entering the LAST layer = last layer + final norm + unembedding applied by hand (atol 1e-6)."""
    model, p = llama.model, prompt_of(llama)
    clean = clean_run(model, p)
    last = len(decoder_layers(model, structure_of(model))) - 1
    mean = torch.randn(clean.resid.shape[-1], generator=torch.Generator().manual_seed(1))
    got = erase_layer(model, p, clean, last, mean, batch_size=4)
    n = len(p.input_ids)
    causal = torch.full((n, n), float("-inf")).triu(1).view(1, 1, n, n)
    positions = torch.arange(n).unsqueeze(0)
    for pos in range(n):
        h = clean.resid[last].clone()
        h[pos] = mean
        with torch.no_grad():
            rotary = model.model.rotary_emb(h.unsqueeze(0), positions)
            out = model.model.layers[last](h.unsqueeze(0), attention_mask=causal, position_ids=positions,
                                           position_embeddings=rotary)
            logits = model.lm_head(model.model.norm(out[0] if isinstance(out, tuple) else out))
        direct = (answer_probs(logits, p)[0] - clean.answer_prob).abs().max().item()
        assert got[pos] == pytest.approx(direct, abs=1e-6)
    assert got.max() > 0  # the test can fail: erasing changes something


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "olmo2", "gpt2", "gpt_neox"])
def test_prefix_reuse_equals_hooked_full_forward(tiny_models: dict[str, Path], arch: str) -> None:
    """Restarting at layer 2 from the cached prefix = a full forward with a hook replacing the cell (atol 1e-6)."""
    loaded = load_model(str(tiny_models[arch]))
    p, layer = prompt_of(loaded), 2
    clean = clean_run(loaded.model, p)
    mean = clean.resid[layer, 1:].mean(0) + 0.5
    got = erase_layer(loaded.model, p, clean, layer, mean, batch_size=3)
    for pos in range(len(p.input_ids)):
        probs = hooked_probs(loaded.model, p, layer, lambda h, pos=pos: h[:, pos].copy_(mean))
        assert got[pos] == pytest.approx((probs - clean.answer_prob).abs().max().item(), abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ig_completeness_and_baseline(tiny_models: dict[str, Path], arch: str) -> None:
    """Σ attributions = f(h) − f(baseline) within the requested 1e-4 (relative) and within the stored error bound;
    f(baseline) and f(h) agree with full forwards (baseline at every position via a hook; the clean run)."""
    loaded = load_model(str(tiny_models[arch]))
    p = prompt_of(loaded)
    ds = igrad_map(loaded.model, p, steps=64, batch_size=64, tolerance=1e-4)
    clean = clean_run(loaded.model, p)
    for layer in ds.layer.values:
        base = clean.resid[layer, :p.n_prompt].double().mean(0).float()
        at_base = hooked_probs(loaded.model, p, int(layer), lambda h, b=base: h.copy_(b.expand_as(h))).sum().item()
        assert ds.target_at_baseline[layer].item() == pytest.approx(at_base, abs=1e-6)
        difference = clean.answer_prob.sum().item() - at_base
        assert ds.output_difference[layer].item() == pytest.approx(difference, abs=1e-6)
        error = abs(ds.attribution_sum[layer].item() - difference)
        assert error <= ds.error_bound[layer].item() + 1e-6 and error <= 1e-4 * max(abs(difference), 0.01)
        assert 64 <= ds.intervals[layer].item() <= 4096
    assert np.abs(ds.attribution.values).max() > 0


def sigmoid_path(weights: np.ndarray, sharpness: float, centre: float = 0.883):
    """A path whose f = Σ_p w_p σ(k (α − c)) jumps in a narrow window, like the real model's attention-sink switch."""
    def evaluate(alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = 1 / (1 + np.exp(-sharpness * (alphas - centre)))
        return s * weights.sum(), (sharpness * s * (1 - s))[:, None] * weights[None, :]
    return evaluate


def test_integrate_path_refines_a_spike() -> None:
    """Equal steps miss a narrow spike (error > 5%); adaptive bisection meets 1e-4 with far fewer evaluations
    than equal steps would need, the stored Σ |interval error| bounds the error, and each position's attribution
    is w_p (f(1) − f(0))."""
    weights = np.array([0.5, -0.2, 1.0])
    path = sigmoid_path(weights, sharpness=400.0)
    f0, f1 = (float(v) for v in path(np.array([0.0, 1.0]))[0])
    uniform = integrate_path(path, steps=16, tolerance=1e-4, max_steps=16)
    assert uniform.intervals == 16 and abs(uniform.attribution.sum() - (f1 - f0)) > 0.05 * abs(f1 - f0)
    adaptive = integrate_path(path, steps=16, tolerance=1e-4, max_steps=4096)
    error = abs(adaptive.attribution.sum() - (f1 - f0))
    assert error <= 1e-4 * abs(f1 - f0) and error <= adaptive.error_bound
    assert adaptive.intervals < 1024
    np.testing.assert_allclose(adaptive.attribution, weights / weights.sum() * (f1 - f0), rtol=2e-4)
    assert (adaptive.f_start, adaptive.f_end) == (f0, f1)


def test_integrate_path_equal_steps_is_the_trapezoidal_rule() -> None:
    """max_steps = steps: no refinement, exactly numpy's trapezoid over equal steps, error bound = Σ |interval error|."""
    path = sigmoid_path(np.array([1.0, 2.0]), sharpness=5.0, centre=0.3)
    alphas = np.linspace(0, 1, 9)
    f, q = path(alphas)
    got = integrate_path(path, steps=8, tolerance=0.0, max_steps=8)
    np.testing.assert_allclose(got.attribution, np.trapezoid(q, alphas, axis=0), rtol=1e-12)
    pieces = [np.trapezoid(q[i:i + 2].sum(1), alphas[i:i + 2]) - (f[i + 1] - f[i]) for i in range(8)]
    assert got.error_bound == pytest.approx(np.abs(pieces).sum(), rel=1e-12) and got.intervals == 8


def test_sequence_mean_matches_hidden_states(llama) -> None:
    """The default reference mean = mean of output_hidden_states[l] over positions ≥ 1 of the same windows."""
    ref = sequence_mean(llama, windows=2)
    from depthcache.extraction.data import load_documents
    from depthcache.extraction.windows import make_windows

    texts = load_documents("pydoc-topics").texts
    tokens = [llama.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:3]]
    sums, count = 0.0, 0
    for window in make_windows(tokens, 128, llama.tokenizer.bos_token_id)[:2]:
        with torch.no_grad():
            out = llama.model(input_ids=torch.tensor([window.tokens]), output_hidden_states=True)
        sums = sums + np.stack([h[0, 1:].double().numpy() for h in out.hidden_states[:-1]]).sum(1)
        count += len(window.tokens) - 1
    np.testing.assert_allclose(ref.mean, sums / count, rtol=1e-5, atol=1e-6)
    assert "2 windows" in ref.source


def test_store_mean_matches_numpy(tmp_path: Path, tiny_models: dict[str, Path], text_file: Path, llama) -> None:
    """--reference: mean of resid_pre over positions ≥ 1 equals numpy's float64 mean; another model is refused."""
    store = str(tmp_path / "ref.zarr")
    extract(ExtractOptions(out=store, model=str(tiny_models["llama"]), data=str(text_file), max_tokens=200,
                           seq_len=32, dtype="float32", chunk_tokens=64, device="cpu"), llama)
    root = zarr.open_group(store, mode="r")
    keep = root["position"][:] >= 1
    expected = root["resid_pre"][:][:, keep].astype(np.float64).mean(1)
    ref = store_mean(store, llama)
    np.testing.assert_allclose(ref.mean, expected, rtol=1e-10)
    assert ref.source.startswith(f"store {store}")
    with pytest.raises(DepthcacheError, match="extracted from model"):
        store_mean(store, load_model(str(tiny_models["gpt2"])))


def run_cli(*args: str) -> tuple[int, str]:
    """Exit code and combined output of ``depthcache ARGS``."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_cli_end_to_end(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """erase over a task file (one store, an item dim) and igrad on one prompt, then plot both."""
    model = str(tiny_models["llama"])
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in ({"id": "a", "prompt": "The quick", "answer": " brown"},
                                                      {"id": "b", "prompt": PROMPT, "answer": ANSWER})))
    erase, igrad = str(tmp_path / "erase.zarr"), str(tmp_path / "igrad.zarr")
    code, out = run_cli("erase", "--model", model, "--task", str(task), "--out", erase, "--device", "cpu",
                        "--reference-windows", "1")
    assert code == 0, out
    ds = read_map(erase)
    assert ds.attrs["depthcache_map"]["kind"] == "erasure" and "1 windows" in ds.attrs["depthcache_map"]["reference"]
    assert list(ds.item.values) == ["a", "b"] and ds.max_prob_change.dims == ("item", "layer", "position")
    assert list(ds.n_positions.values) == [4, 6] and np.isnan(ds.max_prob_change.sel(item="a").values[:, 4:]).all()
    assert list(ds.token.sel(item="a").values[:5]) == ["<s>", "The", " qu", "ick", ""]
    code, out = run_cli("igrad", "--model", model, "--prompt", PROMPT, "--answer", ANSWER, "--out", igrad,
                        "--device", "cpu", "--steps", "16")
    assert code == 0 and "completeness" in out, out
    assert read_map(igrad).attrs["depthcache_map"]["steps"] == 16
    for store, kind, pngs in ((erase, "erasure", ["erasure-a.png", "erasure-b.png"]), (igrad, "igrad", ["igrad.png"])):
        code, out = run_cli("plot", kind, store, "--out", str(tmp_path / kind))
        assert code == 0, out
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == pngs
    code, out = run_cli("plot", "erasure", igrad)
    assert code == 2 and "of kind 'igrad'" in out


@pytest.mark.parametrize("command, args, message", [
    ("erase", ["--prompt", "The quic", "--answer", "k"], "not a token continuation"),
    ("erase", ["--prompt", "fox " * 300, "--answer", " fox"], "context is 256"),
    ("erase", ["--prompt", PROMPT], "--prompt needs --answer"),
    ("igrad", ["--prompt", PROMPT, "--answer", ANSWER, "--steps", "8", "--max-steps", "4"], "--max-steps (4) must"),
    ("igrad", ["--prompt", PROMPT, "--answer", ANSWER, "--tolerance", "-1"], "--tolerance must be at least 0"),
])
def test_cli_bad_input_writes_nothing(tmp_path: Path, tiny_models: dict[str, Path], command: str, args: list[str],
                                      message: str) -> None:
    """Bad prompts or options: exit 2, one 'error:' line, and no store."""
    out = tmp_path / "map.zarr"
    code, text = run_cli(command, "--model", str(tiny_models["llama"]), "--out", str(out), "--device", "cpu", *args)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in text, text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_non_map_is_not_overwritten(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """--out pointing at something that is not a location map is refused before any work."""
    (tmp_path / "keep.zarr").mkdir()
    with pytest.raises(DepthcacheError, match="not a depthcache location map"):
        locate("erasure", LocateOptions(out=str(tmp_path / "keep.zarr"), model=str(tiny_models["llama"]),
                                        prompt=PROMPT, answer=ANSWER))
    assert not is_map(tmp_path / "keep.zarr")


# The paper's measures (issue 30), each against plain torch: full forwards of the tiny Llama with hooks that rewrite a
# module's input or output, hidden states from output_hidden_states, means and sums written out here.

def plain_logits(model: torch.nn.Module, ids: list[int], module: torch.nn.Module, rewrite, output: bool = False
                 ) -> torch.Tensor:  # noqa: ANN001 - rewrite: (hidden (1, T, d)) -> new hidden
    """Logits (T, vocab) of a full forward whose ``module`` input (or, with ``output``, its first output) is
    replaced by ``rewrite(value)``."""
    def pre(mod, args, kwargs):  # noqa: ANN001, ANN202 - torch hook
        if args:
            return (rewrite(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": rewrite(kwargs["hidden_states"])}

    def post(mod, args, out):  # noqa: ANN001, ANN202 - torch hook
        return (rewrite(out[0]), *out[1:]) if isinstance(out, tuple) else rewrite(out)
    handle = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        handle.remove()


def plain_values(model: torch.nn.Module, ids: list[int], module: torch.nn.Module, output: bool = False
                 ) -> torch.Tensor:
    """(T, d) input (or first output) of ``module`` in a plain forward of ``ids``."""
    seen = []
    plain_logits(model, ids, module, lambda h: seen.append(h[0].detach().clone()) or h, output)
    return seen[0]


def row_module(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The tiny Llama's module whose input is residual row ``layer``: decoder layer l, or the final norm at L."""
    return model.model.norm if layer == len(model.model.layers) else model.model.layers[layer]


def test_paper_erasure_matches_hooked_forwards(llama) -> None:
    """--measure distribution-l2 with the final residual (row L): for every cell, max over the positions predicting
    answer tokens of ‖softmax − softmax_clean‖₂ of a full forward whose residual entering layer l (the final norm at
    L) has that position replaced (atol 1e-6); the paper's measure differs from ours."""
    model, p = llama.model, prompt_of(llama)
    depth = len(model.model.layers)
    ids, n_answer = list(p.input_ids), p.n_answer
    with torch.no_grad():
        clean = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -n_answer:], -1)
    mean = torch.randn(depth + 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    layers = [0, 2, depth]
    ours = erasure_map(model, p, mean, layers, batch_size=4)
    paper = erasure_map(model, p, mean, layers, batch_size=4, measure="distribution-l2")
    assert list(paper.layer.values) == layers and paper.relative_depth.values[-1] == 1.0
    for layer in layers:
        for pos in range(len(ids)):
            def erase(h, layer=layer, pos=pos):  # noqa: ANN001, ANN202
                h = h.clone()
                h[:, pos] = mean[layer]
                return h
            with torch.no_grad():
                probs = torch.softmax(plain_logits(model, ids, row_module(model, layer), erase)[-n_answer:], -1)
            expected = (probs - clean).norm(dim=-1).max().item()
            assert paper.max_distribution_l2.sel(layer=layer).values[pos] == pytest.approx(expected, abs=1e-6)
            answer = torch.tensor(p.answer_ids).view(-1, 1)
            change = (probs.gather(1, answer) - clean.gather(1, answer)).abs().max().item()
            assert ours.max_prob_change.sel(layer=layer).values[pos] == pytest.approx(change, abs=1e-6)
    assert not np.allclose(paper.max_distribution_l2.values, ours.max_prob_change.values, atol=1e-3)


@pytest.mark.parametrize("include_first", [False, True])
def test_reference_mean_positions_and_final_row(llama, include_first: bool) -> None:
    """The mean residual over all positions (--include-first) or positions ≥ 1, with the final residual (the final
    norm's input, caught by a plain hook) as row L, equals numpy's mean over the same windows."""
    from depthcache.extraction.data import load_documents
    from depthcache.extraction.windows import make_windows

    ref = sequence_mean(llama, windows=2, include_first=include_first, final=True)
    texts = load_documents("pydoc-topics").texts
    tokens = [llama.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:3]]
    first = 0 if include_first else 1
    sums, count = 0.0, 0
    for window in make_windows(tokens, 128, llama.tokenizer.bos_token_id)[:2]:
        with torch.no_grad():
            out = llama.model(input_ids=torch.tensor([window.tokens]), output_hidden_states=True)
            final = plain_values(llama.model, list(window.tokens), llama.model.model.norm)
        rows = [h[0].double().numpy() for h in out.hidden_states[:-1]] + [final.double().numpy()]
        sums = sums + np.stack(rows)[:, first:].sum(1)
        count += len(window.tokens) - first
    assert ref.mean.shape[0] == len(llama.model.model.layers) + 1
    np.testing.assert_allclose(ref.mean, sums / count, rtol=1e-5, atol=1e-6)
    assert ("position 0 included" in ref.source) == include_first


def plain_ig(model: torch.nn.Module, ids: list[int], n_answer: int, answer_ids: tuple[int, ...],
             module: torch.nn.Module, h: torch.Tensor, base: torch.Tensor, steps: int, output: bool = False
             ) -> tuple[np.ndarray, float, float]:
    """The paper's integrated gradients written out: Σ_{k<steps} ∂f/∂x(b + k/steps (h − b)) · (h − b) / steps per
    position, f = Σ answer-token probabilities of a full forward with ``module``'s input (or output) set to x;
    returns (attribution (T,), f(h), f(b))."""
    def f_at(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = (base + alpha * (h - base)).unsqueeze(0).requires_grad_(True)
        logits = plain_logits(model, ids, module, lambda _: x, output)
        probs = torch.softmax(logits[-n_answer:].float(), -1)
        return probs[torch.arange(n_answer), torch.tensor(answer_ids)].sum(), x
    total = torch.zeros(len(ids), dtype=torch.float64)
    for k in range(steps):
        f, x = f_at(k / steps)
        (grad,) = torch.autograd.grad(f, x)
        total += (grad[0].double() * (h - base).double()).sum(-1) / steps
    return total.numpy(), f_at(1.0)[0].item(), f_at(0.0)[0].item()


def test_paper_igrad_matches_plain_torch(llama) -> None:
    """--rule left-riemann --baseline-positions sequence with the final row: the attribution equals the paper's sum
    written out (baseline: mean over prompt + WHOLE answer of output_hidden_states / the final norm's input), and
    f(h), f(b) equal full forwards."""
    model, p = llama.model, prompt_of(llama)
    depth, steps = len(model.model.layers), 8
    ids, whole = list(p.input_ids), [*p.input_ids, p.answer_ids[-1]]
    ds = igrad_map(model, p, [1, depth], steps=steps, batch_size=5, rule="left-riemann", baseline="sequence")
    assert list(ds.intervals.values) == [steps, steps]
    for layer in (1, depth):
        module = row_module(model, layer)
        h = plain_values(model, ids, module)
        base = plain_values(model, whole, module).double().mean(0).float()
        attribution, f_h, f_b = plain_ig(model, ids, p.n_answer, p.answer_ids, module, h, base, steps)
        np.testing.assert_allclose(ds.attribution.sel(layer=layer).values, attribution, rtol=1e-4, atol=1e-8)
        assert ds.output_difference.sel(layer=layer).item() == pytest.approx(f_h - f_b, abs=1e-8)
        assert ds.target_at_baseline.sel(layer=layer).item() == pytest.approx(f_b, abs=1e-8)
    assert np.abs(ds.attribution.values).max() > 1e-4


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_igrad_sites_match_plain_torch(llama, site: str) -> None:
    """--site attn/mlp: interpolating what the branch of the last layer adds (baseline: its mean over the prompt)
    equals the paper's sum with the plain module's output replaced; the adaptive rule keeps completeness there."""
    model, p = llama.model, prompt_of(llama)
    layer = len(model.model.layers) - 1
    module = getattr(model.model.layers[layer], "self_attn" if site == "attn" else "mlp")
    ids, steps = list(p.input_ids), 6
    ds = igrad_map(model, p, [layer], steps=steps, batch_size=4, rule="left-riemann", site=site)
    h = plain_values(model, ids, module, output=True)
    base = h[:p.n_prompt].double().mean(0).float()
    attribution, f_h, f_b = plain_ig(model, ids, p.n_answer, p.answer_ids, module, h, base, steps, output=True)
    np.testing.assert_allclose(ds.attribution.values[0], attribution, rtol=1e-4, atol=1e-8)
    assert ds.output_difference.item() == pytest.approx(f_h - f_b, abs=1e-8) and abs(f_h - f_b) > 1e-4
    adaptive = igrad_map(model, p, [layer], steps=16, tolerance=1e-4, site=site)
    assert adaptive.target_at_baseline.item() == pytest.approx(f_b, abs=1e-8)
    assert abs(adaptive.attribution_sum.item() - (f_h - f_b)) <= 1e-4 * max(abs(f_h - f_b), 0.01)


def test_igrad_on_one_branch_module_matches_plain_torch(tmp_path: Path) -> None:
    """--site mamba on Falcon-H1 (Mamba beside attention, each with its own multiplier): interpolating what the Mamba
    module alone adds equals the paper's sum with the plain module's output replaced (the multiplier is linear, so
    the attribution does not depend on the scale it is interpolated at), and a module without siblings is refused."""
    from transformers import AutoModelForCausalLM

    from depthcache.coverage import tiny_config, tiny_tokenizer

    config = tiny_config("falcon_h1")
    config.ssm_out_multiplier, config.attention_out_multiplier = 0.5, 0.25
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    model, p = loaded.model, prompt_of(loaded)
    layer, steps, ids = 0, 4, list(p.input_ids)
    ds = igrad_map(model, p, [layer], steps=steps, batch_size=4, rule="left-riemann", site="mamba")
    module = model.model.layers[layer].mamba
    h = plain_values(model, ids, module, output=True)
    base = h[:p.n_prompt].double().mean(0).float()
    attribution, f_h, f_b = plain_ig(model, ids, p.n_answer, p.answer_ids, module, h, base, steps, output=True)
    np.testing.assert_allclose(ds.attribution.values[0], attribution, rtol=1e-3, atol=1e-10)
    assert ds.output_difference.item() == pytest.approx(f_h - f_b, abs=2e-9)  # float32 f: 0.0046 ± 5e-10
    assert np.abs(attribution).max() > 1000 * 1e-10  # a random tiny model's answer barely moves: far above atol
    with pytest.raises(DepthcacheError, match="has no branch module 'feed_forward' beside others"):
        locate("igrad", LocateOptions(model=str(tmp_path / "m"), prompt=PROMPT, answer=ANSWER,
                                      out=str(tmp_path / "m.zarr"), site="feed_forward"), loaded)


def test_left_riemann_is_the_papers_sum() -> None:
    """The left Riemann rule: Σ_{k<n} q(k/n) / n, exactly (numpy), with f at both ends and Σ |interval error|."""
    path = sigmoid_path(np.array([1.0, -2.0]), sharpness=5.0, centre=0.3)
    alphas = np.linspace(0, 1, 9)
    f, q = path(alphas)
    got = left_riemann(path, 8)
    np.testing.assert_allclose(got.attribution, q[:-1].sum(0) / 8, rtol=1e-12)
    assert (got.f_start, got.f_end, got.intervals) == (f[0], f[-1], 8)
    pieces = [q[i].sum() / 8 - (f[i + 1] - f[i]) for i in range(8)]
    assert got.error_bound == pytest.approx(np.abs(pieces).sum(), rel=1e-12)
    assert abs(got.attribution.sum() - (f[-1] - f[0])) > 1e-3  # unlike the trapezoid, not exact on this grid


def test_cli_paper_switch_plan_and_attributes(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """--paper: the plan line marks every paper choice, the map stores them (explicit options win), the final
    residual is row L; our defaults otherwise; a site without a final row refuses --final-residual."""
    model = str(tiny_models["llama"])
    common = ["--model", model, "--prompt", PROMPT, "--answer", ANSWER, "--device", "cpu"]
    erase = str(tmp_path / "erase.zarr")
    result = CliRunner().invoke(main, ["erase", *common, "--out", erase, "--reference-windows", "1", "--paper"])
    assert result.exit_code == 0, result.output
    assert ("erase: measure distribution-l2 (paper), mean residual over all positions (paper), final residual as "
            "row L: yes (paper)") in result.output
    ds = read_map(erase)
    attrs = ds.attrs["depthcache_map"]
    assert (attrs["schema"], attrs["paper"], attrs["measure"], attrs["include_first"], attrs["final_residual"]) == \
        ("1.2", True, "distribution-l2", True, True)
    assert "max_distribution_l2" in ds and "max_prob_change" not in ds and list(ds.layer.values) == [0, 1, 2, 3, 4]
    assert "position 0 included" in attrs["reference"]
    igrad = str(tmp_path / "igrad.zarr")
    result = CliRunner().invoke(main, ["igrad", *common, "--out", igrad, "--paper", "--steps", "4", "--layers", "3"])
    assert result.exit_code == 0, result.output
    assert "rule left-riemann (paper), 4 steps, baseline: mean over the sequence (paper)" in result.output
    attrs = read_map(igrad).attrs["depthcache_map"]
    assert {k: attrs.get(k) for k in ("rule", "steps", "baseline_positions", "site", "final_residual", "tolerance")} \
        == {"rule": "left-riemann", "steps": 4, "baseline_positions": "sequence", "site": "resid",
            "final_residual": True, "tolerance": None}
    assert list(read_map(igrad).layer.values) == [3, 4]
    result = CliRunner().invoke(main, ["igrad", *common, "--out", igrad, "--steps", "4", "--layers", "3"])
    attrs = read_map(igrad).attrs["depthcache_map"]
    assert result.exit_code == 0 and (attrs["rule"], attrs["baseline_positions"], attrs["final_residual"]) == \
        ("adaptive-trapezoid", "prompt", False), result.output
    code, out = run_cli("igrad", *common, "--out", igrad, "--site", "attn", "--final-residual")
    assert code == 2 and "--final-residual needs --site resid" in out


def test_older_map_schemas_still_read(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """Maps of schema 1 and 1.1 (before the measure's choices were named) are read and plotted; unknown ones refused."""
    out = str(tmp_path / "old.zarr")
    locate("erasure", LocateOptions(out=out, model=str(tiny_models["llama"]), prompt=PROMPT, answer=ANSWER,
                                    reference_windows=1, layers="0", device="cpu"))
    meta = Path(out) / "zarr.json"
    for schema, readable in (("1", True), ("1.1", True), ("0.9", False)):
        doc = json.loads(meta.read_text())
        doc["attributes"]["depthcache_map"]["schema"] = schema
        meta.write_text(json.dumps(doc))
        if readable:
            assert read_map(out).attrs["depthcache_map"]["schema"] == schema
            assert run_cli("plot", "erasure", out, "--out", str(tmp_path / schema))[0] == 0
        else:
            with pytest.raises(DepthcacheError, match="schemas 1, 1.1, 1.2"):
                read_map(out)


def shown(key: str, value: object) -> str:
    """A choice's value as --help and docs/analyses.md write it."""
    words = {"include_first": {True: "include", False: "exclude"}, "final_residual": {True: "yes", False: "no"}}
    return words[key][value] if key in words else str(value)


def test_documented_defaults_equal_the_code(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """Ours and the paper's value of every choice agree between the code (OURS, PAPER), each option's --help, the
    table in docs/analyses.md and the attributes a map made without options stores."""
    from depthcache.locate.run import OURS, PAPER

    table = (Path(__file__).parent.parent / "docs" / "analyses.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0] in ("erase", "igrad") and cells[1].startswith("--"):
            rows[cells[0], cells[1].split("/")[0].removeprefix("--").replace("-", "_")] = (cells[2], cells[3])
    model = str(tiny_models["llama"])
    for command, kind, layers in (("erase", "erasure", "0"), ("igrad", "igrad", "3")):
        text = "".join(CliRunner().invoke(main, [command, "--help"]).output.split())  # click wraps at hyphens
        out = str(tmp_path / f"{kind}.zarr")
        code, output = run_cli(command, "--model", model, "--prompt", PROMPT, "--answer", ANSWER, "--out", out,
                               "--device", "cpu", "--layers", layers, "--reference-windows", "1"
                               ) if kind == "erasure" else run_cli(command, "--model", model, "--prompt", PROMPT,
                                                                   "--answer", ANSWER, "--out", out, "--device", "cpu",
                                                                   "--layers", layers)
        assert code == 0, output
        stored = read_map(out).attrs["depthcache_map"]
        for key, ours in OURS[kind].items():
            paper = PAPER[kind][key]
            assert rows[command, key] == (shown(key, ours), shown(key, paper)), (command, key)
            assert f"[default:{shown(key, ours)};{shown(key, paper)}with--paper]" in text, (command, key)
            assert stored[key] == ours and stored["paper"] is False
