"""Measured architecture coverage: every causal LM and every image-text-to-text model transformers registers, built
tiny offline and put through the load check and a 2-window extraction; writes docs/architectures.md.

    python -m depthcache.coverage [--out docs/architectures.md] [--only llama,gemma2,...] [--timeout 60]

Each config is built from its defaults with the sizes shrunk (``TINY``: 4 layers, d_model 64, 4 experts, ...) and
random weights; nothing is downloaded (a multimodal config: its text config shrunk the same way, its other towers to
``TOWER_TINY``, released after building as loading does). A family is supported when its structure is discovered,
the load check passes and the extracted store satisfies the residual identity again.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.model import TOLERANCES, LoadedModel, Structure, checked, relative_errors, tokenizer_files
from depthcache.model.loading import text_ready
from depthcache.model.multimodal import auto_class, release_towers
from depthcache.model.structure import discover
from depthcache.store.head import logits_from_residual, read_head
from depthcache.store.reader import open_dataset

VOCAB = 384
TINY: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "n_embd": 64, "d_model": 64, "intermediate_size": 128, "n_inner": 128,
    "ffn_dim": 128, "ffn_hidden_size": 128, "num_hidden_layers": 4, "n_layer": 4, "num_layers": 4, "n_layers": 4,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
    "head_dim": 16, "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "rotary_dim": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "n_shared_experts": 1,
    "sliding_window": 8, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1, "attn_layer_period": 2,
    "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "word_embed_proj_dim": 64,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "n_group": 1, "topk_group": 1, "n_heads": 4, "kv_n_heads": 2, "expansion_ratio": 2,
    "attention_types": [[["global", "local"], 2]],  # GPT-Neo: one entry per layer
    # non-trivial multipliers where a family has them, so discovery must find them (Granite, HyperCLOVA X)
    "residual_multiplier": 0.5, "logits_scaling": 4.0, "embedding_multiplier": 3.0,
    # encoder-decoder style names, Gemma 3n/4's per-layer inputs, XLM, LongCat
    "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_layers": 4, "encoder_layers": 4,
    "decoder_attention_heads": 4, "encoder_attention_heads": 4, "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16, "emb_dim": 64, "expert_ffn_hidden_size": 128, "layers": 4,
    "attention_heads": 4, "embed_dim": 64,  # Kosmos-2's text model (no causal LM's config has embed_dim)
    "num_experts_per_token": 2, "num_expert_group": 1, "linear_head_dim": 16, "linear_num_heads": 4,  # Kimi, Bailing
}
# Families whose defaults do not build (or run) once shrunk: the smallest change that still builds the architecture.
BUILD: dict[str, dict[str, Any]] = {
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32]},  # its LM head requires a decoder;
    # the axial position widths sum to hidden_size
    "zaya": {"num_experts_per_tok": 1},  # the only routing it supports
    "mamba2": {"num_heads": 8},  # heads × head_dim must equal expand × hidden_size
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 16,
                  "mamba_chunk_size": 16},  # its Mamba widths are not the shrunk hidden size's (1,024 wide by default)
    "gemma3n_text": {"num_kv_shared_layers": 0},  # KV sharing is over layers a 4-layer model does not have
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "dots3_note_text": {"head_dim": 16, "index_head_dim": 16,  # sliding layers: head_dim = qk_nope + qk_rope dims
                        "per_layer_config": {f"{i:02d}": {"num_attention_heads": 4, "num_key_value_heads": 4,
                                                          "kv_lora_rank": 16, "qk_nope_head_dim": 8} for i in (2, 3)}},
    "qwen4_exp_text": {"indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 2,  # unset defaults
                       "indexer_n_heads": 2, "indexer_kv_heads": 1},
    "cohere_compass_text": {"rope_parameters": {kind: {"rope_type": "default", "rope_theta": 10000.0}
                                                for kind in ("full_attention", "sliding_attention")}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # unset: its hybrid pattern
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0}},  # rope_theta read there
    "diffusion_gemma": {"text_config": {"top_k_experts": 2}},  # unset by default
    # token ids the modeling code reads but the default config leaves out (beyond the tiny vocabulary: never input)
    "qwen2_5_omni_thinker": {"vision_start_token_id": VOCAB + 1},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": VOCAB + 1},
    "emu3": {"vocabulary_map": {"<image>": VOCAB + 1}},
    "chameleon": {"vocabulary_map": {"<image>": VOCAB + 1}},
    "mistral4": {"head_dim": 16},  # its head_dim is qk_nope + qk_rope, its rotary part a fraction of that
    "glm5_next_text": {"qk_rope_head_dim": 0, "qk_nope_head_dim": 16, "head_dim": 16, "index_head_dim": 16,
                       "index_n_heads": 2},  # its sparse-attention layers have no rotary part
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                                            "mrope_section": [3, 3, 2]}}},  # height = width
    "molmo2": {"adapter_config": {"vision_feature_layer": [0]}},  # the tiny vision tower's one layer
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},  # unset by default
    "kolibri1_1": {"index_num_heads": 2,  # at most the query heads per KV head (4 / 2)
                   # its 50-layer pattern cut to 4 that it validates: sliding layers, then an indexer layer and an
                   # indexed layer reading its K/V; windows, top-k and pools small enough for 16 tokens to use them
                   "layer_types": ["sliding_attention"] * 2 + ["indexed_attention"] * 2, "index_layers": [2],
                   "kv_source_layers": [0, 1, 2, 2], "mlp_only_layers": [0], "index_topk": 4,
                   "index_pool_size": 8, "index_compression": 2, "index_num_local_tokens": 4,
                   "index_num_sink_tokens": 1},
    # its one shared attention block is tied across the hybrid layers: 4 layers of its pattern hold only one
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    # its visual and audio codebooks' token ranges lie at the end of the vocabulary, back to back: fitted to 384 ids
    "apertus1p5": {"image_token_offset": 256, "audio_token_offset": 320, "vision_config": {"codebook_size": 64},
                   "audio_config": {"codebook_size": 64}},
    # unset by default (each checkpoint names its own): vision layers → the LLM layers their features are added at,
    # the projectors' window rate; its Q-Former projectors have (vision width) / 64 heads: a vision tower 64 wide
    "granite4_vision": {"deepstack_layer_map": [[0, 0], [-1, 1]], "spatial_target_layers": [0, 1, 2, 3],
                        "downsample_rate": "1/2", "vision_config": {"hidden_size": 64}},
    # its byte n-gram hash table (500k rows × 6 n-gram sizes by default) at the tiny vocabulary; its byte-level
    # encoder and decoder read the global transformer's (patch-level) width
    "blt": {"encoder_hash_byte_group_vocab": VOCAB, "encoder_config": {"hidden_size_global": 32},
            "decoder_config": {"hidden_size_global": 32}},
}
# A multimodal wrapper's other towers (vision, audio): built small, released after building, never run on text.
TOWER_TINY = {"num_hidden_layers": 1, "depth": 1, "num_layers": 1, "n_layers": 1, "hidden_size": 32,
              "intermediate_size": 64, "num_attention_heads": 2, "num_heads": 2, "head_dim": 16,
              "num_key_value_heads": 2, "embed_dim": 32, "hidden_dim": 32, "d_model": 32, "encoder_layers": 1,
              "decoder_layers": 1, "vocab_size": VOCAB, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
              "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "codebook_dim": 32}
TEXT_KEYS = ("text_config", "decoder", "generator")  # transformers' names of a composite's text (decoder) config
MAX_PARAMETERS = 20_000_000
MAX_BUILT = 500_000_000  # towers included, built before they are released: 2 GB of float32 at most (Emu3's: 244M)
CORPUS = ("The quick brown fox jumps over the lazy dog. Residual streams carry information from layer to layer. "
          "Numbers: 0 1 2 3 4 5 6 7 8 9 and some punctuation, too! Language models use their depth in many ways.")
SEQ_LEN = 16
DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


@dataclass(frozen=True)
class Row:
    """One family's measured outcome."""

    model_type: str
    class_name: str
    supported: bool
    reason: str = ""
    identity_error: float | None = None
    logits_error: float | None = None
    structure: Structure | None = None
    seconds: float = 0.0


def causal_lm_registry() -> dict[str, str]:
    """transformers' causal-LM registry: model type → class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def image_text_registry() -> dict[str, str]:
    """transformers' image-text-to-text registry: model type → class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()))


def shrunk(defaults: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``sizes`` that the config has with the same type, or unset (a list of widths stays)."""
    return {k: v for k, v in sizes.items() if type(defaults.get(k)) is type(v) or (k in defaults and
                                                                                   defaults[k] is None)}


def head_dim(config: dict[str, Any]) -> int | None:
    """A config's attention head width: head_dim, else hidden_size / num_attention_heads."""
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def rope_sections(text: dict[str, Any]) -> dict[str, Any]:
    """Multimodal rotary sections (time, height, width: Qwen2-VL's ``mrope_section``, which the modeling code may
    default without the config saying so) for a tiny text config: three that sum to half its rotary width."""
    rope = text.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_type" not in rope:  # none, or one per attention kind
        return {}
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor")) or 1.0
    rotary = text.get("qk_rope_head_dim") or int((head_dim(text) or TINY["head_dim"]) * partial)
    total = max(3, rotary // 2)
    return {"rope_parameters": rope | {"mrope_section": [total - 2 * (total // 3), total // 3, total // 3]}}


def per_layer(defaults: dict[str, Any], count: int = TINY["num_hidden_layers"]) -> dict[str, Any]:
    """Per-layer overrides (Gemma 4's ``per_layer_config``) of the tiny model's (or tower's) ``count`` layers only."""
    overrides = defaults.get("per_layer_config")
    if not isinstance(overrides, dict):
        return {}
    return {"per_layer_config": {k: v for k, v in overrides.items() if int(k) < count}}


def fewer_layers(defaults: dict[str, Any], count: int) -> dict[str, Any]:
    """A tower's per-layer lists (layer types, MUSE's patch sizes and depths) cut to its ``count`` layers."""
    layers = defaults.get("num_hidden_layers")
    return {k: v[:count] for k, v in defaults.items() if isinstance(v, list) and v and isinstance(layers, int)
            and (k == "layer_types" or len(v) == layers)}


def tower_config(tower: dict[str, Any], text_hidden: Any) -> dict[str, Any]:
    """A non-text tower's config shrunk (``TOWER_TINY``), its widths that must equal the text model's or its own
    (Dots3's adapter widths, which its config validates) set to the tiny ones."""
    count = TOWER_TINY["num_hidden_layers"]
    sizes = shrunk(tower, TOWER_TINY) | fewer_layers(tower, count) | per_layer(tower, count)
    own = tower.get("hidden_size")
    widths = {own: sizes.get("hidden_size"), text_hidden: TINY["hidden_size"]}  # the text model's wins a tie
    linked = {k: widths[v] for k, v in tower.items() if isinstance(v, int) and v and widths.get(v) and
              k not in sizes and re.search(r"hidden|dim|size", k)}
    return tower | sizes | linked


def timm_free(tower: dict[str, Any]) -> dict[str, Any]:
    """A tower the config names as any ``AutoConfig`` but defaults to a timm model (FastVLM, PerceptionLM): a SigLIP
    vision tower instead, with its width where a wrapper reads a timm tower's (``model_args``), so building needs
    no timm (not a dependency; a full-size timm model besides). The tower is released before text runs."""
    if tower.get("model_type") != "timm_wrapper":
        return tower
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig().to_dict() | {"model_args": {"embed_dim": TOWER_TINY["hidden_size"]}}


def tiny_config(model_type: str) -> Any:
    """The family's default config with every size in ``TINY`` that it has shrunk; a multimodal config's text
    config shrunk the same way and its other towers to ``TOWER_TINY``."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        defaults = cls().to_dict()
    except Exception:  # noqa: BLE001 - defaults that fail their own validation (Gemma 4's assistant): with its facts
        defaults = cls(**BUILD[model_type]).to_dict()
    sizes = {k: v for k, v in TINY.items() if k in defaults} | per_layer(defaults)
    if "kv_lora_rank" in defaults:  # multi-head latent attention: no grouped KV heads, head_dim is the rope part
        sizes |= {"num_key_value_heads": TINY["num_attention_heads"], "head_dim": TINY["qk_rope_head_dim"]}
        if "qk_head_dim" in defaults:  # Mistral 4 states the query/key width too
            sizes["qk_head_dim"] = TINY["qk_nope_head_dim"] + TINY["qk_rope_head_dim"]
    facts = BUILD.get(model_type, {})
    sizes |= {k: v for k, v in facts.items() if not k.endswith("_config")}
    text = next((defaults[key] for key in TEXT_KEYS if isinstance(defaults.get(key), dict)), None)
    text_hidden = text.get("hidden_size") if isinstance(text, dict) else defaults.get("hidden_size")
    subs = getattr(cls, "sub_configs", None) or {}  # MusicGen's are not named *_config
    for key, value in defaults.items():
        if not (key.endswith("_config") or key in subs) or not isinstance(value, dict) or key in sizes:
            continue
        registered = value.get("model_type") in CONFIG_MAPPING
        wrapper = any(isinstance(v, dict) and "model_type" in v for v in value.values())  # (not per_layer_config)
        if registered and (key in TEXT_KEYS or wrapper):
            sub = tiny_config(value["model_type"]).to_dict()  # the text model, or a wrapper inside (PI0's VLM)
            sizes[key] = sub | rope_sections(sub)
        elif key in TEXT_KEYS:  # a text config of its own kind (Kosmos-2)
            sizes[key] = value | {k: v for k, v in TINY.items() if k in value}
        else:
            sizes[key] = tower_config(timm_free(value), text_hidden)
    for key, value in facts.items():
        if key.endswith("_config"):
            sizes[key] = sizes.get(key, {}) | value
    if "mrope_section" in (defaults.get("rope_parameters") or {}):  # its own sections, fitted to the tiny head
        sizes |= rope_sections(defaults | sizes)
    try:
        return cls(**sizes)
    except Exception:  # noqa: BLE001 - a config that validates per-layer or per-kind lists (ERNIE 4.5-VL)
        return cls(**(sizes | as_lists(defaults, sizes)))


def as_lists(defaults: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """Sizes given as one int where the config has a list of ints (one per expert kind), and per-layer lists cut to
    the tiny layer count: what a strictly validated config needs."""
    count = defaults.get("num_hidden_layers")
    out: dict[str, Any] = {}
    for key, value in defaults.items():
        if not isinstance(value, list) or not value or key == "layer_types":
            continue
        if isinstance(sizes.get(key), int) and all(isinstance(v, int) for v in value):
            out[key] = [sizes[key]] * len(value)
        elif len(value) == count and all(isinstance(v, str) for v in value):
            out[key] = value[:TINY["num_hidden_layers"]]
    return out


def causal_lm(config: Any, model_type: str) -> torch.nn.Module:
    """The family's causal LM built from ``config`` (towers not yet released) through the auto class, or through
    the registry's class from the sub-config of its config class where the config is a composite the auto class does
    not unwrap (MusicGen's ``decoder``: transformers swaps in a ``text_config`` only)."""
    import transformers

    cls = getattr(transformers, causal_lm_registry().get(model_type, ""), None)
    wanted = getattr(cls, "config_class", None)
    subs = [getattr(config, key, None) for key in getattr(config, "sub_configs", None) or {}]
    own = next((sub for sub in subs if wanted is not None and isinstance(sub, wanted)), None)
    if own is None or isinstance(config, wanted) or "text_config" in config.sub_configs:
        return auto_class(config).from_config(config)
    return cls._from_config(own)


def tiny_model(model_type: str, seed: int = 0, image_text: bool = False) -> torch.nn.Module:
    """A random-weight model of the family at tiny size, in eval mode, through the causal-LM auto class (else the
    image-text-to-text one), or with ``image_text`` the image-text-to-text registry's class: a wrapper has its towers
    released, as loading does. Counted on the meta device first, towers and all (they are built before they are
    released), so an oversized config never allocates."""
    import transformers

    config = tiny_config(model_type)
    if image_text and getattr(config, "is_encoder_decoder", False):  # (a causal LM class takes the decoder alone)
        raise DepthcacheError("not a residual-stream decoder: it is an encoder-decoder")

    def build() -> torch.nn.Module:
        if not image_text:
            return causal_lm(config, model_type)
        return getattr(transformers, image_text_registry()[model_type])._from_config(config)

    with torch.device("meta"):
        model = build()
        built = sum(p.numel() for p in model.parameters())
        counted = sum(p.numel() for p in release_towers(model).parameters())
    if built > MAX_BUILT:
        raise DepthcacheError(f"not tiny: {built / 1e6:.0f}M parameters built with the shrunk config, towers included")
    if counted > MAX_PARAMETERS:
        raise DepthcacheError(f"not tiny: {counted / 1e6:.0f}M parameters with the shrunk config")
    torch.manual_seed(seed)
    return text_ready(release_towers(build())).eval()


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer of ``VOCAB`` ids trained on ``CORPUS`` (offline, in milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def loaded_tiny(model: torch.nn.Module, tokenizer: Any) -> LoadedModel:
    """A LoadedModel around a tiny model built in memory (provenance as for a local folder without weights)."""
    provenance = {"spec": f"tiny:{model.config.model_type}", "alias": None, "source": "local", "path": None,
                  "revision": None, "weights_sha256": None, "architecture": type(model).__name__,
                  "model_type": model.config.model_type}
    return LoadedModel(model, tokenizer, provenance, tokenizer_files(tokenizer))


def store_errors(store: Path) -> tuple[float, float]:
    """(identity, next-token log-prob) errors of an extracted store: the residual identity on the stored arrays, and
    the stored head's logit lens of resid_final against the stored next-token log-probs."""
    ds = open_dataset(str(store)).load()
    h = ds.resid_pre.values.astype(np.float64)
    branches = sum(ds[n].values.astype(np.float64) for n in ("attn_out", "mlp_out") if n in ds)  # Mamba: no mlp_out
    nxt = np.concatenate([h[1:], ds.resid_final.values[None].astype(np.float64)])
    identity = float(relative_errors(h + branches, nxt).max())
    z = logits_from_residual(ds.resid_final.values, read_head(str(store))).astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ids = ds.next_token_id.values
    has = ids >= 0
    lens = logp[np.arange(len(ids)), np.maximum(ids, 0)]
    return identity, float(np.abs(lens[has] - ds.next_logprob.values[has]).max()) if has.any() else 0.0


def two_window_extraction(loaded: LoadedModel, folder: Path) -> tuple[float, float]:
    """Extract 2 windows of ``SEQ_LEN`` tokens in float32 and measure the store's errors."""
    data = folder / "docs.jsonl"
    data.write_text(json.dumps({"text": CORPUS}) + "\n")
    out = folder / "store.zarr"
    extract(ExtractOptions(out=str(out), model=loaded.provenance["spec"], data=str(data), dtype="float32",
                           seq_len=SEQ_LEN, max_tokens=2 * SEQ_LEN, batch_size=2, chunk_tokens=SEQ_LEN,
                           progress=False, device="cpu", top_k=4), loaded)
    return store_errors(out)


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after ``seconds`` (main thread only; 0: no limit)."""
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire) if seconds else None
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        if previous is not None:
            signal.signal(signal.SIGALRM, previous)


def short(exc: BaseException, text: str | None = None) -> str:
    """One line describing an exception (or ``text`` from it), at most 160 characters."""
    text = " ".join((str(exc) if text is None else text).split())
    return (text if isinstance(exc, DepthcacheError) else f"{type(exc).__name__}: {text}")[:160]


def cover(model_type: str, class_name: str = "", tokenizer: Any = None, timeout: int = 0, image_text: bool = False
          ) -> Row:
    """Build the family tiny (``image_text``: through its image-text-to-text class), discover its structure, run
    the load check and a 2-window extraction."""
    start = time.perf_counter()
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = tiny_model(model_type, image_text=image_text)
            except DepthcacheError as exc:
                refused = str(exc).startswith("not a residual")
                return Row(model_type, class_name, False, short(exc) if refused else f"not built: {short(exc)}")
            except ImportError as exc:  # a tower whose class needs an optional package transformers names
                return Row(model_type, class_name, False, text_model_refusal(model_type) or missing_package(exc))
            except Exception as exc:  # noqa: BLE001 - any family's constructor may fail in any way offline
                return Row(model_type, class_name, False, f"not built offline at tiny size ({short(exc)})")
            class_name = type(model).__name__
            structure, result = checked(model)
            with tempfile.TemporaryDirectory() as tmp:
                identity, logprob = two_window_extraction(loaded_tiny(model, tokenizer or tiny_tokenizer()),
                                                          Path(tmp))
            ident_tol, logit_tol = TOLERANCES[torch.float32]
            if not (identity <= ident_tol and logprob <= logit_tol):
                return Row(model_type, class_name, False, f"the extracted store is off (identity {identity:.2g}, "
                           f"log-prob {logprob:.2g})", seconds=time.perf_counter() - start)
    except DepthcacheError as exc:
        why = NOT_ON_TEXT.get(model_type, reason(exc))
        return Row(model_type, class_name, False, why, seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - the probe forward of an unsupported family may fail in any way
        why = NOT_ON_TEXT.get(model_type, f"forward failed ({short(exc)})")
        return Row(model_type, class_name, False, why, seconds=time.perf_counter() - start)
    return Row(model_type, class_name, True, "", max(result.identity_error, identity), result.logits_error, structure,
               time.perf_counter() - start)


def text_model_refusal(model_type: str) -> str | None:
    """Why the family's language model, built alone from the text config, is refused (the structural reason, which
    no tower package changes: Gemma 3n's AltUp); None when it is not refused or cannot be built."""
    from transformers import AutoModelForCausalLM

    try:
        torch.manual_seed(0)
        text = AutoModelForCausalLM.from_config(tiny_config(model_type).get_text_config()).eval()
        discover(text)
    except DepthcacheError as exc:
        return f"its language model: {reason(exc)}"
    except Exception:  # noqa: BLE001 - a text config need not build alone
        return None
    return None


def missing_package(exc: ImportError) -> str:
    """'needs the timm package for its vision tower': the optional package a tower's class requires, in one line."""
    found = re.search(r"(\w+) requires the (\w+) library", str(exc))
    if found is None:
        return f"not built offline at tiny size ({short(exc)})"
    cls, package = found.groups()
    part = "vision tower" if cls == "TimmWrapperModel" else "tower"
    return f"needs the {package} package for its {part} ({cls}), not a dependency of depthcache"


# Families whose forward does not run on one sequence of token ids at all, from their modeling code: what a failed
# probe forward (discovery's own words name only the symptom) means for them.
DRAFTER = ("a drafter for a Gemma 4 target model: it runs on the target's hidden states and KV cache "
           "(inputs_embeds, shared_kv_states), never on tokens alone")
CODEBOOKS = ("an audio decoder: its input is one token stream per codebook (their embeddings summed) and it has a "
             "head per codebook, not one token sequence")
NOT_ON_TEXT = {"gemma4_assistant": DRAFTER, "gemma4_unified_assistant": DRAFTER, "musicgen": CODEBOOKS,
               "musicgen_melody": CODEBOOKS}
REASONS = {"is not a residual-stream decoder: ": "not a residual-stream decoder: ",
           "fails the load check: ": "load check fails: "}


def reason(exc: DepthcacheError) -> str:
    """The refusal's reason without the 'Class (type) is not ...' prefix the table already shows."""
    for marker, label in REASONS.items():
        if marker in str(exc):
            return short(exc, label + str(exc).partition(marker)[2])
    return short(exc)


def notes(structure: Structure) -> str:
    """What discovery found that differs from a plain pre-norm decoder, in a few words."""
    out = []
    if structure.parallel:
        out.append("parallel")
    if structure.attn_post_norm or structure.mlp_post_norm:
        out.append("post-norm outputs")
    if structure.attn_adds_residual:
        out.append("branches add residual")
    if structure.moe_layers:
        out.append("MoE")
    if structure.idle_layers:
        out.append(f"layers {', '.join(map(str, structure.idle_layers))} idle on text, removed")
    if structure.head_dense:
        out.append(f"head transform (dense, {structure.head_activation}, norm)")
    if structure.norm_offset:
        out.append("norm (1+w)")
    if structure.branch_scale != 1.0:
        out.append(f"branch ×{structure.branch_scale:g}")
    if structure.logit_scale != 1.0:
        out.append(f"logits ×{structure.logit_scale:g}")
    if structure.logit_softcap:
        out.append(f"soft-cap {structure.logit_softcap:g}")
    if structure.embed_scale not in (None, 1.0):
        out.append(f"embed ×{structure.embed_scale:g}")
    if len(set(structure.attn_classes)) > 1:
        out.append("hybrid mixers")
    if "mlp" not in structure.roles:
        out.append("no MLP")
    if any(not path for path in (*structure.attn, *structure.mlp)) and structure.roles == ("attn", "mlp"):
        out.append("one branch per layer")
    for role, label in (("attn", "token mixers"), ("mlp", "MLPs")):
        most = max(len(structure.paths(role, layer)) for layer in range(structure.n_layers))
        if most > 1:
            out.append(f"{most} {label} ({', '.join(dict.fromkeys(p for e in getattr(structure, role) for p in e.split('+') if p))})")
    if structure.part_scales:
        out.append("per-branch ×(" + ", ".join(f"{path} {value:g}" for path, value in structure.part_scales) + ")")
    if structure.input_norm:
        out.append(f"stream from {structure.input_norm}")
    if structure.sliding_window:
        out.append("sliding window")
    if structure.language_model:
        out.append(f"via {structure.language_model}")
    out.append(structure.norm_kind)
    return ", ".join(out)


def table(rows: list[Row]) -> list[str]:
    """One registry's markdown table."""
    lines = ["| model type | transformers class | supported | why not / what discovery found | identity error | "
             "logits error |", "|---|---|---|---|---|---|"]
    for r in rows:
        errs = ("—", "—") if r.identity_error is None else (f"{r.identity_error:.1e}", f"{r.logits_error:.1e}")
        detail = notes(r.structure) if r.structure is not None else r.reason.replace("|", "/")
        lines.append(f"| {r.model_type} | {r.class_name} | {'yes' if r.supported else 'no'} | {detail} | "
                     f"{errs[0]} | {errs[1]} |")
    return lines


def tally(rows: list[Row]) -> str:
    """'**P of N model types pass** (C distinct classes'."""
    passed = [r for r in rows if r.supported]
    return (f"**{len(passed)} of {len(rows)} model types pass** ({len({r.class_name for r in passed})} distinct "
            "transformers classes")


def render(rows: list[Row], image_rows: list[Row]) -> str:
    """docs/architectures.md: the measured tables and how they were made."""
    import transformers

    lines = [
        "# Architecture coverage",
        "",
        "Generated by `make architectures` (`python -m depthcache.coverage`); do not edit by hand.",
        "",
        "Real models (the aliases' GGUF weights, dequantized): their load times and load-check errors are measured "
        "in [real-models.md](real-models.md), written by hand from the runs' logs and stores.",
        "",
        "## Causal language models",
        "",
        f"Every causal LM in transformers {transformers.__version__}'s registry (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, "
        f"{len(rows)} model types) is built offline from its default config shrunk to 4 layers and d_model 64 with "
        "random weights, its structure is discovered, and it goes through the load check (32 tokens) and a "
        "2-window extraction in float32 whose store must satisfy the residual identity again. Errors are relative "
        "to each token's largest value (identity: the largest over layers of the check and the store; logits: the "
        "logit lens of `resid_final` against the model's logits). A multimodal config is built with its text "
        "config shrunk the same way and its other towers (vision, audio) to 1 layer of width 32 (one that defaults "
        "to a timm model as a SigLIP one: timm is not a dependency); the towers are released after building, as "
        "loading does, so only the language model runs (\"via\" names its class).",
        "",
        f"{tally(rows)}; torch {torch.__version__}, Python {platform.python_version()}).",
        "",
        *table(rows),
        "",
        "## Image-text-to-text models (multimodal checkpoints through their language model)",
        "",
        f"Every model type of transformers' image-text-to-text registry (`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`, "
        f"{len(image_rows)} model types), built tiny through that registry's class (the checkpoint's wrapper) in the "
        "same way and put through the same check and extraction on text input.",
        "",
        f"{tally(image_rows)}).",
        "",
        *table(image_rows),
    ]
    return "\n".join(lines) + "\n"


def sweep(registry: dict[str, str], wanted: list[str], tokenizer: Any, timeout: int, image_text: bool
          ) -> list[Row]:
    """Cover each wanted model type of a registry, printing a line per type."""
    rows = []
    for model_type in wanted:
        row = cover(model_type, registry.get(model_type, ""), tokenizer, timeout, image_text)
        rows.append(row)
        print(f"{model_type:28s} {'PASS' if row.supported else 'no  '} {row.seconds:5.1f}s "
              f"{notes(row.structure) if row.structure else row.reason}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the sweep over both registries and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DOC))
    parser.add_argument("--only", default="", help="comma-separated model types (default: the whole registries)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per model type")
    parser.add_argument("--memory-gib", type=int, default=12, help="address-space limit: a family whose defaults "
                        "allocate more is reported, not killed by the kernel")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_gib << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    only = [t for t in args.only.split(",") if t]
    tokenizer = tiny_tokenizer()
    causal, images = causal_lm_registry(), image_text_registry()
    rows = sweep(causal, [t for t in causal if not only or t in only], tokenizer, args.timeout, False)
    image_rows = sweep(images, [t for t in images if not only or t in only], tokenizer, args.timeout, True)
    Path(args.out).write_text(render(rows, image_rows))
    for name, some in (("causal LM", rows), ("image-text-to-text", image_rows)):
        print(f"{name}: {tally(some).replace('**', '')})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
