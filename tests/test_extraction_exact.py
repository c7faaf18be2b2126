"""Extraction writes exactly what plain forward hooks capture from the same batches, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from depthcache.extraction.engine import ExtractOptions, extract, output_summary, summary_rows
from depthcache.model import decoder_layers, structure_of, submodule, token_runs
from depthcache.store.reader import open_dataset

SEQ_LEN, BATCH = 32, 3


def plain_capture(model_dir: Path, windows: list[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Every site of every layer, the final residual and the logits of the real tokens, batch by batch, with
    hand-written hooks on a fresh model: what the store must hold."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    structure = structure_of(model)
    layers = decoder_layers(model, structure)
    seen: dict[str, list[torch.Tensor]] = {"resid_pre": [], "attn_out": [], "mlp_out": [], "resid_final": []}
    for i, block in enumerate(layers):
        block.register_forward_pre_hook(lambda m, a, k: seen["resid_pre"].append(
            (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
        submodule(block, structure.attn[i]).register_forward_hook(lambda m, a, o: seen["attn_out"].append(
            (o[0] if isinstance(o, tuple) else o).clone()))
        submodule(block, structure.mlp[i]).register_forward_hook(lambda m, a, o: seen["mlp_out"].append(
            (o[0] if isinstance(o, tuple) else o).clone()))
    submodule(model, structure.final_norm).register_forward_pre_hook(
        lambda m, a, k: seen["resid_final"].append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    out: dict[str, list[np.ndarray]] = {name: [] for name in [*seen, "logits"]}
    for first in range(0, len(windows), BATCH):
        group = windows[first:first + BATCH]
        ids = torch.full((len(group), SEQ_LEN), pad_id)
        mask = torch.zeros((len(group), SEQ_LEN), dtype=torch.long)
        for row, tokens in enumerate(group):
            ids[row, :len(tokens)], mask[row, :len(tokens)] = torch.tensor(tokens), 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        real = mask.flatten().bool()
        for name, tensors in seen.items():
            stacked = torch.stack(tensors) if name != "resid_final" else tensors[0][None]
            out[name].append(stacked.flatten(1, 2)[:, real].numpy())
            tensors.clear()
        out["logits"].append(logits.flatten(0, 1)[real][None].numpy())
    return {name: np.concatenate(parts, axis=1) for name, parts in out.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_store_equals_plain_hooks_bit_for_bit(arch: str, tiny_models, text_file, tmp_path) -> None:
    stores = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.zarr"
        extract(ExtractOptions(out=str(out), model=str(tiny_models[arch]), data=str(text_file), dtype=dtype,
                               seq_len=SEQ_LEN, batch_size=BATCH, chunk_tokens=64, top_k=5, progress=False,
                               device="cpu"))
        stores[dtype] = open_dataset(out).load()
    ds = stores["float32"]
    windows = [ds.token_id.values[ds.seq_id.values == s] for s in np.unique(ds.seq_id.values)]
    assert any(len(w) < SEQ_LEN for w in windows[:-1])  # padded windows inside batches, not only at the end
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_models[arch])
    plain = plain_capture(tiny_models[arch], windows, tokenizer.pad_token_id or 0)
    for name in ("resid_pre", "attn_out", "mlp_out"):
        np.testing.assert_array_equal(ds[name].values, plain[name])
        bf16 = torch.from_numpy(plain[name]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(stores["bfloat16"][name].values.astype(np.float32), bf16)
    np.testing.assert_array_equal(ds.resid_final.values, plain["resid_final"][0])
    # the output summary is today's formula on the real tokens' logits: log-sum-exp, top-k, the next token's entry
    logits = torch.from_numpy(plain["logits"][0])
    lse = torch.logsumexp(logits, -1)
    top = torch.topk(logits, 5, -1)
    nxt = torch.from_numpy(ds.next_token_id.values).long()
    picked = logits.gather(-1, nxt.clamp(min=0)[:, None])[:, 0] - lse
    for store in stores.values():
        np.testing.assert_array_equal(store.topk_ids.values, top.indices.numpy())
        np.testing.assert_array_equal(store.topk_logprobs.values, (top.values - lse[:, None]).numpy())
        np.testing.assert_array_equal(store.next_logprob.values, torch.where(nxt >= 0, picked, np.nan).numpy())


@pytest.mark.parametrize("lengths, drop, keep, expect", [
    ([4, 4, 4], 0, 12, ((0, 12, 0),)),                       # full windows: one run, a view of the whole batch
    ([4, 2, 4], 0, 10, ((0, 6, 0), (8, 12, 6))),             # padding after the second window splits the rows
    ([4, 2, 4], 3, 5, ((3, 6, 0), (8, 10, 3))),              # resume inside a batch, stop before its end
    ([1, 1], 1, 1, ((4, 5, 0),)),
])
def test_token_runs(lengths, drop, keep, expect) -> None:
    assert token_runs(lengths, 4, drop, keep) == expect


def test_blocked_summary_equals_the_summary_of_gathered_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 128, 3000) * 4
    runs = token_runs([128, 100, 128, 7, 128], 128, 3, 380)
    index = torch.cat([torch.arange(a, b) for a, b, _ in runs])
    nxt = torch.randint(-1, 3000, (len(index),))
    expect = output_summary(logits.flatten(0, 1)[index], nxt, 20)
    got = summary_rows(logits, runs, nxt, 20)
    for name in expect:
        np.testing.assert_array_equal(got[name].numpy(), expect[name].numpy())


def test_zstd_level_compresses_activations_to_the_same_values(tiny_models, text_file, tmp_path) -> None:
    import json

    from depthcache.errors import DepthcacheError

    opts = dict(model=str(tiny_models["llama"]), data=str(text_file), seq_len=SEQ_LEN, batch_size=BATCH,
                chunk_tokens=64, progress=False, device="cpu")
    plain, packed = tmp_path / "plain.zarr", tmp_path / "zstd.zarr"
    extract(ExtractOptions(out=str(plain), **opts))
    extract(ExtractOptions(out=str(packed), zstd_level=3, **opts))
    codecs = {p: [c["name"] for c in json.loads((p / "mlp_out" / "zarr.json").read_text())["codecs"][0]
                  ["configuration"]["codecs"]] for p in (plain, packed)}  # 2.0: the inner chunks' codecs
    assert codecs == {plain: ["bytes", "crc32c"], packed: ["bytes", "zstd", "crc32c"]}
    a, b = open_dataset(plain).load(), open_dataset(packed).load()
    for name in ("resid_pre", "attn_out", "mlp_out", "resid_final"):
        np.testing.assert_array_equal(a[name].values.view(np.uint16), b[name].values.view(np.uint16))
    with pytest.raises(DepthcacheError, match="--zstd-level"):
        extract(ExtractOptions(out=str(tmp_path / "bad.zarr"), zstd_level=-1, **opts))
