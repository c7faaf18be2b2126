"""Multimodal checkpoints through their language model: a tiny LLaVA saved as a checkpoint, loaded, checked and
extracted on text; its vision tower is released and never runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from depthcache.coverage import CORPUS, cover, tiny_config, tiny_tokenizer
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.model import load_model
from depthcache.model.multimodal import tower_paths, without_towers
from depthcache.store.io import read_attrs
from depthcache.store.reader import open_dataset


def test_a_llava_checkpoint_is_extracted_through_its_language_model(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    wrapper = AutoModelForImageTextToText.from_config(tiny_config("llava")).eval()
    assert tower_paths(wrapper) == ["model.multi_modal_projector", "model.vision_tower"]
    folder = tmp_path / "llava"
    wrapper.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    ids = torch.arange(3, 19).view(1, -1)
    with torch.no_grad():
        want = wrapper(input_ids=ids).logits  # the whole wrapper on text: what the released one must compute

    # built without its towers: their weights are the checkpoint's unused keys, never read into the model
    from transformers import LlavaForConditionalGeneration

    _, info = without_towers(LlavaForConditionalGeneration).from_pretrained(folder, output_loading_info=True)
    towers = ("model.vision_tower.", "model.multi_modal_projector.")
    tower_keys = {k for k in wrapper.state_dict() if k.startswith(towers)}
    assert tower_keys and set(info["unexpected_keys"]) == tower_keys and not info["missing_keys"]

    loaded = load_model(str(folder))
    model = loaded.model
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.model.vision_tower is None and model.model.multi_modal_projector is None  # released, never run
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in wrapper.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)

    data, out = tmp_path / "d.jsonl", tmp_path / "s.zarr"
    data.write_text('{"text": "%s"}\n' % CORPUS)
    extract(ExtractOptions(out=str(out), model=str(folder), data=str(data), dtype="float32", seq_len=16,
                           max_tokens=32, batch_size=2, chunk_tokens=16, progress=False, device="cpu"), loaded)
    structure = read_attrs(zarr.open_group(str(out), mode="r"))["model"]["structure"]
    assert structure["class_name"] == "LlavaForConditionalGeneration" and structure["language_model"] == "LlamaModel"
    assert structure["layers"] == "model.language_model.layers"
    ds = open_dataset(str(out)).load()
    h = ds.resid_pre.values.astype(np.float64)
    nxt = np.concatenate([h[1:], ds.resid_final.values[None].astype(np.float64)])
    added = h + ds.attn_out.values + ds.mlp_out.values
    assert np.abs(added - nxt).max() <= 1e-5 * np.abs(nxt).max()  # the residual identity, from the store


def test_image_text_registry_types_are_covered_through_their_wrapper() -> None:
    tokenizer = tiny_tokenizer()
    for model_type, wrapper, language_model in (("mistral3", "Mistral3ForConditionalGeneration", "MistralModel"),
                                                ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                                                 "Qwen2_5_VLTextModel")):
        row = cover(model_type, tokenizer=tokenizer, image_text=True)
        assert row.supported, row.reason
        assert row.class_name == wrapper and row.structure.language_model == language_model
        assert row.identity_error <= 1e-5 and row.logits_error <= 1e-4


def test_a_checkpoint_that_needs_an_image_is_refused_with_that_reason() -> None:
    row = cover("blip-2", tokenizer=tiny_tokenizer(), image_text=True)
    assert not row.supported and "needs an image (pixel_values)" in row.reason
