"""Coverage's tiny builds of the families that need a fact or a general mechanism to build (issue 29): each builds
under MAX_PARAMETERS and runs on token ids, and the families that cannot are refused in one line that says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from depthcache import coverage
from depthcache.coverage import (
    CODEBOOKS,
    DRAFTER,
    MAX_PARAMETERS,
    VOCAB,
    cover,
    missing_package,
    tiny_model,
    tiny_tokenizer,
)
from depthcache.errors import DepthcacheError
from depthcache.model.loading import load_model, text_ready

IDS = torch.arange(3, 19).view(1, -1)

# (model type, through the image-text-to-text class): what made each build — see BUILD and tiny_config
BUILT = [("blt", False),  # hash table at the tiny vocabulary (was 96M parameters), global width linked
         ("dots3_note", False),  # tower adapter width linked to the tower's own; per-layer overrides cut
         ("kolibri1_1", False),  # layer pattern, indexer and KV sharing cut to 4 layers
         ("zamba", False),  # two hybrid layers to share the tied attention block
         ("xmod", False),  # language adapter chosen as loading does
         ("apertus1p5", True),  # codebook token ranges inside the tiny vocabulary
         ("granite4_vision", True),  # deepstack map, spatial layers, window rate, Q-Former width
         ("fast_vlm", True), ("perception_lm", True),  # a SigLIP tower where timm was the default
         ("inkling_mm_model", True)]  # its vision tower's layer count (n_layers) shrunk: it allocated 23 GB


@pytest.mark.parametrize("model_type, image_text", BUILT)
def test_family_builds_tiny_and_runs_on_token_ids(model_type: str, image_text: bool) -> None:
    model = tiny_model(model_type, image_text=image_text)
    assert sum(p.numel() for p in model.parameters()) <= MAX_PARAMETERS
    with torch.no_grad():
        logits = model(input_ids=IDS, use_cache=False).logits
    assert logits.shape == (1, 16, VOCAB) and torch.isfinite(logits).all()


def test_towers_are_counted_before_they_are_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coverage, "MAX_BUILT", 100_000_000)  # Emu3's VQ tower: 244M, its text model 1M
    with pytest.raises(DepthcacheError, match=r"not tiny: 244M parameters built with the shrunk config, towers incl"):
        tiny_model("emu3", image_text=True)


def test_musicgen_builds_its_decoder_which_reads_one_stream_per_codebook() -> None:
    model = tiny_model("musicgen")
    assert type(model).__name__ == "MusicgenForCausalLM" and model.config.num_codebooks == 4
    with torch.no_grad():
        logits = model(input_ids=IDS.repeat(4, 1), use_cache=False).logits  # (batch × codebooks, tokens)
    assert logits.shape == (4, 16, VOCAB)  # a head per codebook
    with pytest.raises(RuntimeError):  # one token stream is not its input
        model(input_ids=IDS, use_cache=False)


def test_text_ready_picks_english_else_the_first_language_and_keeps_a_chosen_one() -> None:
    model = tiny_model("xmod")
    assert model.config.default_language == "en_XX"
    for languages, chosen, want in ((["de_DE", "en_XX"], None, "en_XX"), (["de_DE", "fr_XX"], None, "de_DE"),
                                    (["de_DE", "en_XX"], "de_DE", "de_DE")):
        model.config.languages, model.config.default_language = languages, chosen
        assert text_ready(model).config.default_language == want


def test_an_xmod_checkpoint_without_a_language_loads_to_discoverys_verdict(tmp_path: Path) -> None:
    model = tiny_model("xmod")
    model.config.default_language = None  # as X-MOD checkpoints are saved: set_default_language is left to the user
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(DepthcacheError) as err:  # its forward runs; discovery then refuses a post-LN encoder
        load_model(str(tmp_path))
    assert "is not a residual-stream decoder" in str(err.value) and "language" not in str(err.value)


def test_a_timm_tower_gives_way_to_the_language_models_own_reason() -> None:
    row = cover("gemma3n", image_text=True)  # with or without timm: Gemma 3n's AltUp keeps several streams
    assert not row.supported and "keeps several residual streams (altup: Gemma3nTextAltUp)" in row.reason
    error = ImportError("TimmWrapperModel requires the timm library but it was not found in your environment.")
    assert missing_package(error) == ("needs the timm package for its vision tower (TimmWrapperModel), not a "
                                      "dependency of depthcache")


@pytest.mark.parametrize("model_type, why", [("gemma4_assistant", DRAFTER), ("gemma4_unified_assistant", DRAFTER),
                                             ("musicgen", CODEBOOKS)])
def test_a_family_that_does_not_run_on_one_token_sequence_is_refused_saying_so(model_type: str, why: str) -> None:
    row = cover(model_type)
    assert not row.supported and row.reason == why
