"""skip-effects against a direct numpy/torch computation from the stored arrays, plus its structure and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import xarray as xr
from conftest import write_documents

from depthcache.analyze import plot, run
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.skip_runs import SkipOptions, extract_skips
from depthcache.store.reader import open_dataset


@pytest.fixture(scope="module")
def stores(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float32 and a bfloat16 store of the tiny Llama with current- and future-variant runs of every layer."""
    root = tmp_path_factory.mktemp("skipeffects")
    data = root / "docs.jsonl"
    write_documents(data, [3 + i % 4 for i in range(8)])
    out = {}
    for dtype in ("float32", "bfloat16"):
        opts = ExtractOptions(out=str(root / f"{dtype}.zarr"), model=str(tiny_models["llama"]), data=str(data),
                              dtype=dtype, seq_len=48, batch_size=3, chunk_tokens=32, progress=False, device="cpu")
        extract_skips(opts, SkipOptions("each", tokens=96))
        extract_skips(opts, SkipOptions("each", tokens=64, variant="future"))
        out[dtype] = Path(opts.out)
    return out


def reference(store: Path, model_dir: Path, variant: str) -> dict[str, np.ndarray]:
    """The analysis computed directly: float64 numpy over whole arrays, probabilities from the model's own head."""
    base = open_dataset(store).load()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double().eval()

    def probs(h: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model.lm_head(model.model.norm(torch.tensor(h.astype(np.float64)))), -1).numpy()

    depth = base.sizes["layer"]
    out = {k: np.zeros((depth, depth)) for k in ("max", "mean")}
    out |= {k: np.zeros(depth) for k in ("l2_max", "l2_mean", "kl_mean", "top1", "logprob")}
    suffix = "" if variant == "current" else "_future"
    for s in range(depth):
        r = open_dataset(store, group=f"runs/skip_{s}{suffix}").load()
        spec = r.attrs["depthcache"]["intervention"]
        n, draws = spec["baseline_tokens"], spec["draws"]
        d_base = (base.attn_out.values.astype(np.float64) + base.mlp_out.values.astype(np.float64))[s:, :n]
        d_run = r.attn_out.values.astype(np.float64) + r.mlp_out.values.astype(np.float64)
        pos = base.position.values[:n]
        rels, weights, l2s, kls, top1s, lps = [], [], [], [], [], []
        p_base = probs(base.resid_final.values[:n])
        for k in range(draws):
            tokens = slice(k * n, k * n + n)
            if variant == "current":
                w = pos >= 1
            else:
                stop = r.skip_stop.values[tokens]
                w = (stop > 0) & (pos >= stop)
            rel = np.linalg.norm(d_run[:, tokens] - d_base, axis=-1) / np.maximum(np.linalg.norm(d_base, axis=-1), 1e-6)
            rels.append(rel[:, w])
            weights.append(w.sum())
            p = probs(r.resid_final.values[tokens])
            l2s.append(np.linalg.norm(p - p_base, axis=-1)[w])
            kls.append((p_base * (np.log(p_base) - np.log(p))).sum(-1)[w])
            top1s.append((p.argmax(-1) != p_base.argmax(-1))[w])
            delta = r.next_logprob.values[tokens].astype(np.float64) - base.next_logprob.values[:n]
            lps.append(delta[w & np.isfinite(delta)])
        rel = np.concatenate(rels, axis=1)
        out["max"][s, s:], out["mean"][s, s:] = rel.max(1), rel.mean(1)
        out["l2_max"][s], out["l2_mean"][s] = np.concatenate(l2s).max(), np.concatenate(l2s).mean()
        out["kl_mean"][s], out["top1"][s] = np.concatenate(kls).mean(), np.concatenate(top1s).mean()
        out["logprob"][s] = np.concatenate(lps).mean()
    return out


@pytest.mark.parametrize("dtype, variant", [("float32", "current"), ("float32", "future"), ("bfloat16", "current")])
def test_skip_effects_match_a_direct_computation(dtype, variant, stores, tiny_models) -> None:
    result = run("skip-effects", str(stores[dtype]), variant=variant)
    ref = reference(stores[dtype], tiny_models["llama"], variant)
    for var, key in (("max_effect", "max"), ("mean_effect", "mean"), ("output_l2_max", "l2_max"),
                     ("output_l2_mean", "l2_mean"), ("output_kl_mean", "kl_mean"), ("top1_change", "top1"),
                     ("logprob_change_mean", "logprob")):
        np.testing.assert_allclose(result[var].values, ref[key], rtol=2e-4, atol=1e-6, err_msg=var)
    effect = result.max_effect.values
    assert (effect[np.tril_indices(4, -1)] == 0).all()  # layers before the skipped one: exactly 0
    np.testing.assert_array_equal(np.diag(effect), np.ones(4) if variant == "current" else np.zeros(4))
    later = [effect[s, s + 1:].mean() for s in range(3)]
    np.testing.assert_allclose(result.later_effect.values[:3], later)
    assert np.isnan(result.later_effect.values[3])
    assert result.attrs["tokens"] == (96 if variant == "current" else 64)


def test_skip_effects_are_cached_and_plotted(stores, tmp_path) -> None:
    first = run("skip-effects", str(stores["float32"]))
    again = run("skip-effects", str(stores["float32"]))
    xr.testing.assert_identical(first.drop_attrs(), again.drop_attrs())
    paths = plot("skip-effects", str(stores["float32"]), out_dir=str(tmp_path))
    assert [p.name for p in paths] == ["skip-effects.png", "skip-effects-mean.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_skip_effects_refuse_stores_without_complete_runs(stores, tiny_models, tmp_path) -> None:
    bare = tmp_path / "bare.zarr"
    extract(ExtractOptions(out=str(bare), model=str(tiny_models["llama"]), data=str(stores["float32"].parent /
                                                                                      "docs.jsonl"),
                           dtype="float32", seq_len=48, batch_size=3, chunk_tokens=32, progress=False, device="cpu"))
    with pytest.raises(DepthcacheError, match="no current-variant skip runs of the layer.*--skip each"):
        run("skip-effects", str(bare))
    with pytest.raises(DepthcacheError, match="no current-variant skip runs of the mlp.*--skip-sublayer mlp"):
        run("skip-effects", str(stores["float32"]), sublayer="mlp")
    partial = tmp_path / "partial.zarr"
    shutil.copytree(stores["float32"], partial)
    meta = partial / "runs" / "skip_2" / "zarr.json"
    attrs = json.loads(meta.read_text())
    attrs["attributes"]["depthcache"]["progress"] = {"tokens_committed": 32, "complete": False}
    meta.write_text(json.dumps(attrs))
    with pytest.raises(DepthcacheError, match="run 'skip_2' .* is incomplete"):
        run("skip-effects", str(partial), force=True)
