"""One small table of where each supported architecture keeps its layers, sublayer outputs and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from depthcache.errors import DepthcacheError


@dataclass(frozen=True)
class Architecture:
    """Module paths of a decoder-only family; ``attn``/``mlp`` are the modules whose output is ADDED to the residual."""

    family: str
    layers: str
    final_norm: str
    attn: str
    mlp: str
    norm_kind: str  # "rmsnorm" or "layernorm": how the final norm is applied in the logit lens


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "model.layers", "model.norm", "self_attn", "mlp", "rmsnorm"),
    "qwen2": Architecture("qwen2", "model.layers", "model.norm", "self_attn", "mlp", "rmsnorm"),
    "qwen3": Architecture("qwen3", "model.layers", "model.norm", "self_attn", "mlp", "rmsnorm"),
    # OLMo 2 normalises each sublayer's output before adding it (post-norm): the norms' outputs are added.
    "olmo2": Architecture("olmo2", "model.layers", "model.norm", "post_attention_layernorm",
                          "post_feedforward_layernorm", "rmsnorm"),
    "gpt2": Architecture("gpt2", "transformer.h", "transformer.ln_f", "attn", "mlp", "layernorm"),
    "gpt_neox": Architecture("gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "attention", "mlp",
                             "layernorm"),
}


def architecture_for(model: torch.nn.Module) -> Architecture:
    """The adapter of a loaded model, or a clear error naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise DepthcacheError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def submodule(root: torch.nn.Module, dotted: str) -> Any:
    """``root.a.b`` for ``dotted == 'a.b'``."""
    module: Any = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(model: torch.nn.Module, arch: Architecture) -> torch.nn.ModuleList:
    """The model's list of decoder layers."""
    return submodule(model, arch.layers)


def n_layers(model: torch.nn.Module) -> int:
    """Number of decoder layers of a loaded model."""
    return len(decoder_layers(model, architecture_for(model)))


def final_norm_params(model: torch.nn.Module, arch: Architecture) -> dict[str, Any]:
    """Weight, bias (or None) and epsilon of the final norm, as float32 CPU tensors and a float."""
    norm = submodule(model, arch.final_norm)
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps")
    bias = getattr(norm, "bias", None)
    return {"weight": norm.weight.detach().float().cpu(),
            "bias": None if bias is None else bias.detach().float().cpu(),
            "eps": float(eps), "kind": arch.norm_kind}


def unembedding(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection (vocab, d_model) and its bias, as float32 CPU tensors."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.detach().float().cpu(), (None if bias is None else bias.detach().float().cpu())


def parallel_residual(model: torch.nn.Module) -> bool:
    """True when attention and MLP both read the layer input (GPT-NeoX default)."""
    return bool(getattr(model.config, "use_parallel_residual", False))
