"""Multimodal checkpoints (image-text-to-text and the like) through their language model.

A ``*ForConditionalGeneration`` wrapper runs text alone through its language model: on ``input_ids`` without
pixels its vision or audio towers never run. So the wrapper is kept as transformers builds it (its own forward,
embeddings, head and soft-cap), its towers are released right after loading (``release_towers``: never moved to a
device, never run), and discovery finds the decoder layers inside it as for any causal LM; the load check then
proves the text path on every layer. The store's structure names the wrapper (``class_name``) and its language
model's class (``language_model``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

# Children of a wrapper (or of the modules on the way to its embeddings) that belong to another modality: encoders
# and their projectors.
TOWER = re.compile(r"vision|visual|image|audio|speech|video|multi_modal|mm_proj|projector|connector|vqmodel|vq_model|"
                   r"resampler|perceiver|patch_embed|qformer|sound|generation_|vq_")  # generation_: Janus's image head
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")


def is_multimodal(config: Any) -> bool:
    """Whether a config wraps a text config beside others, or has a tower's config (Chameleon's VQ model)."""
    towers = any(TOWER.search(name) for name in getattr(config, "sub_configs", None) or {})
    return towers or config.get_text_config(decoder=True) is not config


def auto_class(config: Any) -> Any:
    """The auto class that knows the config: the causal-LM one, else the image-text-to-text one (LLaVA, Mistral 3,
    Qwen2.5-VL are registered only there)."""
    import transformers

    for name in AUTO_CLASSES:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            return auto
    return transformers.AutoModelForCausalLM  # its own error names the registered configurations


class AutoTextLM:
    """``from_pretrained``/``from_config`` for any checkpoint whose text runs through a causal LM: a causal LM as
    such, a multimodal wrapper with its towers released."""

    @staticmethod
    def from_pretrained(name: Any, **kwargs: Any) -> torch.nn.Module:
        """Load through the causal-LM auto class, else (a configuration it does not know) the image-text-to-text
        one."""
        import transformers

        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            model = transformers.AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        return release_towers(model)

    @staticmethod
    def from_config(config: Any, **kwargs: Any) -> torch.nn.Module:
        """Build (random weights) through the auto class that knows the config."""
        return release_towers(auto_class(config).from_config(config, **kwargs))


def tower_paths(model: torch.nn.Module) -> list[str]:
    """Paths of a wrapper's non-text towers: children of the model and of the modules on the way to its embeddings
    and head whose names say vision, audio, projector and the like; [] for a text-only model."""
    config = getattr(model, "config", None)
    if config is None or not is_multimodal(config):
        return []
    keep = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    found, stack = [], [("", model)]
    while stack:
        prefix, parent = stack.pop()
        for name, child in parent.named_children():
            if child is None:
                continue
            if any(id(m) in keep for m in child.modules()):
                if not isinstance(child, torch.nn.ModuleList):
                    stack.append((f"{prefix}{name}.", child))  # on the way to the embeddings: look inside
            elif TOWER.search(name.lower()):
                found.append(f"{prefix}{name}")
    return sorted(found)


def release_towers(model: torch.nn.Module) -> torch.nn.Module:
    """The model with a multimodal wrapper's towers set to None (text input never reaches them), so they hold no
    memory and never move to a device."""
    for path in tower_paths(model):
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, None)
    return model


def language_model_class(model: torch.nn.Module, layers: str) -> str | None:
    """A multimodal wrapper's language model: the class of the module holding its decoder layers; None for a
    text-only model."""
    config = getattr(model, "config", None)
    if config is None or not is_multimodal(config):
        return None
    return type(model.get_submodule(layers.rpartition(".")[0])).__name__
