"""Extraction: captured tensors are exactly what the model computes, for every supported architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import xarray as xr
import zarr
from conftest import ARCHS

from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.store.head import load_tokenizer, logits_from_residual, read_head
from depthcache.store.reader import open_dataset
from depthcache.store.schema import validate_store


def run(tmp_path: Path, model: Path, data: Path, name: str = "s.zarr", **kw) -> Path:
    """Extract into tmp_path/name with small test defaults."""
    opts = dict(out=str(tmp_path / name), model=str(model), data=str(data), dtype="float32", seq_len=32,
                batch_size=3, chunk_tokens=64, progress=False, device="cpu")
    extract(ExtractOptions(**(opts | kw)))
    return tmp_path / name


def hf_hidden_states(model_dir: Path, ds: xr.Dataset) -> list[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """(token ids, output_hidden_states) of each stored window, computed directly with transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seq_ids = ds.seq_id.values
    out = []
    for seq in np.unique(seq_ids):
        ids = ds.token_id.values[seq_ids == seq]
        with torch.no_grad():
            res = model(torch.tensor(ids)[None], output_hidden_states=True)
        out.append((seq_ids == seq, tuple(h[0].numpy() for h in res.hidden_states), res.logits[0].numpy()))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_sublayers_sum_to_residual_and_match_hidden_states(arch: str, tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models[arch], text_file)
    ds = open_dataset(store).load()
    h, a, m = ds.resid_pre.values, ds.attn_out.values, ds.mlp_out.values
    n_layers = h.shape[0]
    # the identity resid_pre[l+1] = resid_pre[l] + attn_out[l] + mlp_out[l] (and resid_final after the last layer)
    nxt = np.concatenate([h[1:], ds.resid_final.values[None]])
    np.testing.assert_allclose(h + a + m, nxt, rtol=1e-5, atol=1e-5)
    # sublayer outputs are not trivially zero (so the identity is informative)
    assert np.abs(a).mean() > 1e-3 and np.abs(m).mean() > 1e-3
    head = read_head(store)
    for mask, hidden, logits in hf_hidden_states(tiny_models[arch], ds):
        for layer in range(n_layers):
            np.testing.assert_allclose(h[layer][mask], hidden[layer], rtol=1e-5, atol=1e-5)
        # HF's last hidden state is after the final norm: the stored norm + unembedding reproduce the logits
        np.testing.assert_allclose(logits_from_residual(ds.resid_final.values[mask], head), logits,
                                   rtol=1e-4, atol=1e-4)


def test_output_summary_matches_log_softmax(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["llama"], text_file, top_k=5)
    ds = open_dataset(store).load()
    for mask, _, logits in hf_hidden_states(tiny_models["llama"], ds):
        logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
        nxt = ds.next_token_id.values[mask]
        expect = np.where(nxt >= 0, logp[np.arange(len(nxt)), np.maximum(nxt, 0)], np.nan)
        np.testing.assert_allclose(ds.next_logprob.values[mask], expect, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ds.topk_logprobs.values[mask], -np.sort(-logp, axis=-1)[:, :5], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(np.sort(ds.topk_ids.values[mask][:, 0]), np.sort(logp.argmax(-1)))


def test_tokens_windows_and_bookkeeping(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["llama"], text_file)
    ds = open_dataset(store)
    tok = load_tokenizer(store)
    docs = [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
    for doc_id, text in enumerate(docs):
        sel = ds.doc_id.values == doc_id
        ids = ds.token_id.values[sel]
        body = ids[ds.position.values[sel] > 0]  # BOS starts every window of this Llama-like tokenizer
        assert tok.decode(body) == text
        assert (ids[ds.position.values[sel] == 0] == tok.bos_token_id).all()
    assert ds.position.max() < 32 and ds.sizes["token"] == ds.attrs["depthcache"]["layout"]["n_tokens"]


def test_bfloat16_store_opens_with_plain_xarray(tiny_models, text_file, tmp_path) -> None:
    f32 = open_dataset(run(tmp_path, tiny_models["qwen3"], text_file, name="f32.zarr")).load()
    bf16_path = run(tmp_path, tiny_models["qwen3"], text_file, name="bf16.zarr", dtype="bfloat16")
    ds = xr.open_zarr(bf16_path, consolidated=False)
    assert ds.resid_pre.dtype.name == "bfloat16" and ds.resid_pre.dims == ("layer", "token", "d_model")
    np.testing.assert_array_equal(ds.resid_pre.values.astype(np.float32),
                                  f32.resid_pre.values.astype(ds.resid_pre.dtype).astype(np.float32))
    meta = json.loads((bf16_path / "resid_pre" / "zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]  # schema 2.0: one inner chunk per layer inside each shard
    assert meta["data_type"] == "bfloat16" and meta["codecs"][0]["name"] == "sharding_indexed"
    assert sharding["codecs"][-1]["name"] == "crc32c" and sharding["index_codecs"][-1]["name"] == "crc32c"
    assert sharding["chunk_shape"][0] == 1


def test_layer_and_site_subsets(tiny_models, text_file, tmp_path) -> None:
    full = open_dataset(run(tmp_path, tiny_models["gpt2"], text_file, name="full.zarr")).load()
    part = open_dataset(run(tmp_path, tiny_models["gpt2"], text_file, name="part.zarr", layers="1,3",
                            sites=("attn",))).load()
    assert list(part.layer.values) == [1, 3] and "resid_pre" not in part and "mlp_out" not in part
    np.testing.assert_array_equal(part.attn_out.values, full.attn_out.sel(layer=[1, 3]).values)


def test_validate_accepts_good_store_and_reports_corrupt_chunk(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["llama"], text_file, dtype="bfloat16")
    assert validate_store(str(store)) == []
    chunk = store / "mlp_out" / "c" / "0" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = validate_store(str(store))
    assert len(problems) == 1 and "'mlp_out' token chunk 1" in problems[0]


def test_resume_refuses_other_options_and_leaves_store_unchanged(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["llama"], text_file)
    before = (store / "zarr.json").read_bytes()
    with pytest.raises(DepthcacheError, match="already exists"):
        run(tmp_path, tiny_models["llama"], text_file)
    with pytest.raises(DepthcacheError, match="seq_len"):
        run(tmp_path, tiny_models["llama"], text_file, seq_len=16, resume=True)
    with pytest.raises(DepthcacheError, match="weights_sha256"):
        run(tmp_path, tiny_models["gpt2"], text_file, resume=True)
    assert (store / "zarr.json").read_bytes() == before


@pytest.mark.parametrize("kw, message", [
    ({"sites": ("resid", "mlpp")}, "unknown site"),
    ({"layers": "2-9"}, "out of range"),
    ({"model": "./no/such/model"}, "no such model path"),
    ({"out": "/proc/x.zarr"}, "cannot write"),
    ({"dtype": "int8"}, "unknown --dtype"),
])
def test_bad_input_is_refused_with_a_clear_error(kw, message, tiny_models, text_file, tmp_path) -> None:
    with pytest.raises(DepthcacheError, match=message):
        run(tmp_path, kw.pop("model", tiny_models["llama"]), text_file, **kw)
    assert not (tmp_path / "s.zarr").exists()


def test_empty_dataset_is_refused(tiny_models, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DepthcacheError, match="no text"):
        run(tmp_path, tiny_models["llama"], empty)
    assert not (tmp_path / "s.zarr").exists()


def test_store_is_self_contained(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["olmo2"], text_file)
    root = zarr.open_group(str(store), mode="r")
    attrs = root.attrs["depthcache"]
    assert attrs["model"]["config"]["model_type"] == "olmo2" and attrs["progress"]["complete"]
    tok = load_tokenizer(store)
    assert tok("The quick")["input_ids"] == transformers.AutoTokenizer.from_pretrained(
        tiny_models["olmo2"])("The quick")["input_ids"]
