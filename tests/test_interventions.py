"""Layer-skip runs: the intervention is exact, matches an independently modified model, and runs resume and refuse."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import zarr
from click.testing import CliRunner
from conftest import ARCHS, write_documents

from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction import skip_runs as interventions
from depthcache.extraction.engine import ExtractOptions
from depthcache.extraction.skip_runs import SkipOptions, extract_skips, parse_skip
from depthcache.model.capture import Capture
from depthcache.model.skips import Skip
from depthcache.model.structure import decoder_layers, structure_of
from depthcache.store.reader import open_dataset


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six documents of 40-90 tokens: windows of 32 tokens, several batches and chunks."""
    path = tmp_path_factory.mktemp("skipdata") / "docs.jsonl"
    write_documents(path, [2 + i % 3 for i in range(6)])
    return path


def options(store: Path, model: Path, data: Path, **kw) -> ExtractOptions:
    """Small float32 extraction options (chunks of 32 tokens, batches of 3 windows of 32)."""
    return ExtractOptions(**(dict(out=str(store), model=str(model), data=str(data), dtype="float32", seq_len=32,
                                  batch_size=3, chunk_tokens=32, progress=False, device="cpu") | kw))


def arrays(group: Path) -> dict[str, bytes]:
    """Raw bytes of every array of a group (not its subgroups)."""
    root = zarr.open_group(str(group), mode="r")
    return {name: np.ascontiguousarray(a[...]).tobytes() for name, a in root.arrays()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sublayer", ["layer", "attn", "mlp"])
def test_skipped_branch_adds_exactly_zero_and_earlier_layers_are_unchanged(arch, sublayer, tiny_models) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    spec = structure_of(model)
    layers = range(len(decoder_layers(model, spec)))
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False  # position 0 is never skipped
    captured = []
    for skip in (False, True):
        with ExitStack() as stack, torch.no_grad():
            if skip:  # entered first, so the capture hooks see the zeroed outputs
                stack.enter_context(Skip(model, spec, (2,), sublayer, mask))
            cap = stack.enter_context(Capture(model, spec, layers, ("resid", "attn", "mlp")))
            model(input_ids=ids)
            captured.append({k: cap.stacked(k).numpy() for k in ("resid_pre", "attn_out", "mlp_out")})
    base, run = captured
    for name in ("resid_pre", "attn_out", "mlp_out"):
        np.testing.assert_array_equal(run[name][:2], base[name][:2])  # layers before the skip: bit for bit
        np.testing.assert_array_equal(run[name][:, :, 0], base[name][:, :, 0])  # position 0: untouched
    np.testing.assert_array_equal(run["resid_pre"][2], base["resid_pre"][2])
    zeroed = {"layer": ("attn_out", "mlp_out"), "attn": ("attn_out",), "mlp": ("mlp_out",)}[sublayer]
    for name in zeroed:
        assert not run[name][2, :, 1:].any()
    if sublayer == "layer":
        np.testing.assert_array_equal(run["resid_pre"][3][:, 1:], run["resid_pre"][2][:, 1:])  # returns its input
    assert not np.allclose(run["resid_pre"][3], base["resid_pre"][3])


class SkipAfterFirst(torch.nn.Module):
    """Layer ``layer`` of a copied model, returning its input at every position but the first (manual reference)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(hidden, *args, **kwargs)
        return torch.cat([out[:, :1], hidden[:, 1:]], dim=1)


@pytest.mark.parametrize("arch", ["llama", "olmo2", "gpt_neox"])
def test_skip_run_equals_a_model_whose_layer_returns_its_input(arch, tiny_models, docs, tmp_path) -> None:
    store = tmp_path / "s.zarr"
    extract_skips(options(store, tiny_models[arch], docs), SkipOptions("2", tokens=40))
    base, run = open_dataset(store).load(), open_dataset(store, group="runs/skip_2").load()
    n = run.sizes["token"]
    assert n == 64 and list(run.layer.values) == [2, 3]  # 40 tokens rounded up to whole chunks; layers >= 2 stored
    spec = run.attrs["depthcache"]["intervention"]
    assert spec["prefix"] == "baseline" and spec["baseline_tokens"] == 64 and spec["layers"] == [2]
    np.testing.assert_array_equal(run.token_id.values, base.token_id.values[:n])
    manual = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    spec_m = structure_of(manual)
    blocks = decoder_layers(manual, spec_m)
    blocks[2] = SkipAfterFirst(blocks[2])
    d_run = (run.attn_out + run.mlp_out).values
    for seq in np.unique(run.seq_id.values):
        sel = run.seq_id.values == seq
        with Capture(manual, spec_m, (2, 3), ("resid",)) as cap, torch.no_grad():
            logits = manual(torch.tensor(run.token_id.values[sel])[None]).logits[0]
        logp = torch.log_softmax(logits, -1).numpy()
        nxt = run.next_token_id.values[sel]
        expect = np.where(nxt >= 0, logp[np.arange(len(nxt)), np.maximum(nxt, 0)], np.nan)
        np.testing.assert_allclose(run.next_logprob.values[sel], expect, rtol=1e-5, atol=1e-5)
        h = [cap.records["resid_pre"][2][0], cap.records["resid_pre"][3][0], cap.resid_final[0]]
        np.testing.assert_allclose(run.resid_final.values[sel], h[2].numpy(), rtol=1e-5, atol=1e-5)
        for i in range(2):  # the run's attn_out + mlp_out of layers 2 and 3 = h_{l+1} − h_l of the manual model
            np.testing.assert_allclose(d_run[i][sel], (h[i + 1] - h[i]).numpy(), rtol=1e-4, atol=1e-4)
    # the residual identity: resid_final = baseline resid_pre[2] + the run's contributions of layers 2 and 3
    np.testing.assert_allclose(run.resid_final.values, base.resid_pre.values[2][:n] + d_run.sum(0),
                               rtol=1e-5, atol=1e-5)


def test_prefix_reuse_gives_the_same_run_as_recomputing(tiny_models, docs, tmp_path) -> None:
    reuse, recompute = tmp_path / "reuse.zarr", tmp_path / "recompute.zarr"
    extract_skips(options(reuse, tiny_models["qwen3"], docs), SkipOptions("3", tokens=64))
    shutil.copytree(reuse, recompute)
    shutil.rmtree(recompute / "runs" / "skip_3")
    extract_skips(options(recompute, tiny_models["qwen3"], docs), SkipOptions("3", tokens=64, prefix="recompute"))
    got, want = arrays(reuse / "runs" / "skip_3"), arrays(recompute / "runs" / "skip_3")
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in got)


def test_future_variant_skips_only_before_the_drawn_position(tiny_models, docs, tmp_path) -> None:
    store = tmp_path / "f.zarr"
    extract_skips(options(store, tiny_models["llama"], docs), SkipOptions("1", tokens=64, variant="future"))
    base, run = open_dataset(store).load(), open_dataset(store, group="runs/skip_1_future").load()
    assert run.sizes["token"] == 4 * 64  # one pass per draw
    stop, pos = run.skip_stop.values, run.position.values
    lengths = np.bincount(base.seq_id.values)  # whole windows, also those the 64 tokens cut
    assert set(np.unique(stop)) <= {0, 8, 16, 24} and (stop[stop > 0] <= lengths[run.seq_id.values[stop > 0]] - 8).all()
    d_run = (run.attn_out + run.mlp_out).values[0]
    d_base = np.tile((base.attn_out + base.mlp_out).values[1][:64], (4, 1))
    skipped = (pos >= 1) & (pos < stop)
    assert skipped.any() and not d_run[skipped].any()
    np.testing.assert_array_equal(d_run[~skipped], d_base[~skipped])  # layer 1 itself is unchanged elsewhere


def test_parse_skip() -> None:
    assert parse_skip("each", 3) == [(0,), (1,), (2,)]
    assert parse_skip("range 1-2", 4) == parse_skip("range:1-2", 4) == [(1,), (2,)]
    assert parse_skip("3,1+2,3", 4) == [(3,), (1, 2)]
    with pytest.raises(DepthcacheError, match="out of range: the model has layers 0..3"):
        parse_skip("99", 4)
    with pytest.raises(DepthcacheError, match="bad --skip"):
        parse_skip("20-29", 30)


def test_bad_skip_input_writes_nothing(tiny_models, docs, tmp_path) -> None:
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(main, ["extract", "--model", str(tiny_models["llama"]), "--data", str(docs), "--out",
                                       str(store), "--skip", "99", "--device", "cpu"])
    assert result.exit_code == 2 and "layer 99 is out of range" in result.output and not store.exists()
    with pytest.raises(DepthcacheError, match="more than the baseline's"):
        extract_skips(options(store, tiny_models["llama"], docs, max_tokens=64), SkipOptions("1", tokens=1000))
    assert not store.exists()
    extract_skips(options(store, tiny_models["llama"], docs, max_tokens=64), SkipOptions("1", tokens=32))
    meta = store / "zarr.json"
    attrs = json.loads(meta.read_text())
    attrs["attributes"]["depthcache"]["progress"] = {"tokens_committed": 32, "complete": False}
    meta.write_text(json.dumps(attrs))  # a baseline interrupted after one chunk
    before = sorted(p.name for p in (store / "runs").iterdir())
    with pytest.raises(DepthcacheError, match="32 committed baseline tokens but the skip run needs the first 64"):
        extract_skips(options(store, tiny_models["llama"], docs, max_tokens=64), SkipOptions("2", tokens=64))
    with pytest.raises(DepthcacheError, match="already has run 'skip_1'"):
        extract_skips(options(store, tiny_models["llama"], docs, max_tokens=64), SkipOptions("1", tokens=32))
    with pytest.raises(DepthcacheError, match="another model"):
        extract_skips(options(store, tiny_models["qwen2"], docs, max_tokens=64), SkipOptions("2", tokens=32))
    assert sorted(p.name for p in (store / "runs").iterdir()) == before
    partial = tmp_path / "attn-only.zarr"
    with pytest.raises(DepthcacheError, match="lacks the sites mlp, resid"):
        extract_skips(options(partial, tiny_models["llama"], docs, sites=("attn",)), SkipOptions("1", tokens=32))
    assert not (partial / "runs").exists()


def test_interrupted_skip_run_resumes_to_identical_data(tiny_models, docs, tmp_path, monkeypatch) -> None:
    reference, interrupted = tmp_path / "reference.zarr", tmp_path / "interrupted.zarr"
    extract_skips(options(reference, tiny_models["llama"], docs), SkipOptions("1", tokens=96))
    shutil.copytree(reference, interrupted)
    shutil.rmtree(interrupted / "runs")
    real_write = interventions.write_attrs
    calls = []

    def failing_write(group, attrs) -> None:  # noqa: ANN001 - test double
        calls.append(attrs["progress"]["tokens_committed"])
        if len(calls) == 3:  # run created, first chunk committed, then the second commit fails
            raise OSError("simulated crash")
        real_write(group, attrs)

    monkeypatch.setattr(interventions, "write_attrs", failing_write)
    with pytest.raises(DepthcacheError, match="simulated crash while writing tokens 32..64; the first 32 tokens are "
                                              "committed and intact: fix that and rerun with --resume"):
        extract_skips(options(interrupted, tiny_models["llama"], docs), SkipOptions("1", tokens=96))
    monkeypatch.setattr(interventions, "write_attrs", real_write)
    run = interrupted / "runs" / "skip_1"
    assert json.loads((run / "zarr.json").read_text())["attributes"]["depthcache"]["progress"] == \
        {"tokens_committed": 32, "complete": False}
    extract_skips(options(interrupted, tiny_models["llama"], docs, resume=True), SkipOptions("1", tokens=96))
    got, want = arrays(run), arrays(reference / "runs" / "skip_1")
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in got)
    progress = json.loads((run / "zarr.json").read_text())["attributes"]["depthcache"]["progress"]
    assert progress == {"tokens_committed": 96, "complete": True}
