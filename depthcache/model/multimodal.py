"""Multimodal checkpoints (image-text-to-text and the like) through their language model.

A ``*ForConditionalGeneration`` wrapper runs text alone through its language model: on ``input_ids`` without pixels
its vision or audio towers never run. So the wrapper is kept as transformers builds it (its own forward, embeddings,
head and soft-cap) but built without its towers (``without_towers``: released as the instance is constructed, so
loading neither allocates nor reads their weights, which remain the checkpoint's unused keys; a model built in
memory has them released after building), and discovery finds the decoder layers inside it as for any causal LM; the
load check then proves the text path on every layer. The store's structure names the wrapper (``class_name``) and
its language model's class (``language_model``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Children of a wrapper (or of the modules on the way to its embeddings) that belong to another modality: encoders
# and their projectors.
TOWER = re.compile(r"vision|visual|image|audio|speech|video|multi_modal|mm_proj|projector|connector|vqmodel|vq_model|"
                   r"resampler|perceiver|patch_embed|qformer|sound|generation_|vq_")  # generation_: Janus's image head
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")
CONFIG_KEYS = ("local_files_only", "trust_remote_code", "revision", "cache_dir", "token")  # what AutoConfig takes


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
        """Load through the auto class that knows the checkpoint's config; a multimodal wrapper is built without
        its towers, so their weights are never read (they are the checkpoint's unused keys)."""
        import transformers

        if "gguf_file" in kwargs:  # a GGUF holds a text model
            return transformers.AutoModelForCausalLM.from_pretrained(name, **kwargs)
        config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(
            name, **{k: kwargs[k] for k in CONFIG_KEYS if k in kwargs})
        auto = auto_class(config)
        if not is_multimodal(config) or type(config) not in auto._model_mapping:
            return auto.from_pretrained(name, config=config, **kwargs)  # (an unknown config: the auto class's error)
        with quiet_unused_keys():
            model = without_towers(auto._model_mapping[type(config)]).from_pretrained(name, config=config, **kwargs)
        return release_towers(model)

    @staticmethod
    def from_config(config: Any, **kwargs: Any) -> torch.nn.Module:
        """Build (random weights) through the auto class that knows the config."""
        return release_towers(auto_class(config).from_config(config, **kwargs))


@contextmanager
def quiet_unused_keys() -> Iterator[None]:
    """transformers' load report at error level only: the towers' weights, unused by design, are not news."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(was)


def without_towers(cls: type) -> type:
    """A subclass of a wrapper class (same name) whose instances release their towers as they are built: loading
    allocates and reads no tower weight."""
    def __init__(self: torch.nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, config, *args, **kwargs)
        release_towers(self)
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


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
    memory and never move to a device, and its language model's head exposed where the wrapper does not expose it."""
    expose_head(model)
    for path in tower_paths(model):
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, None)
    return model


def expose_head(model: torch.nn.Module) -> None:
    """A wrapper holding a whole causal LM whose ``get_output_embeddings`` says None (Nemotron-H Omni) answers with
    that language model's head: the module its logits come from."""
    if model.get_output_embeddings() is not None:
        return
    inner = next((m for m in model.modules() if m is not model and hasattr(m, "get_output_embeddings")
                  and m.get_output_embeddings() is not None), None)
    if inner is not None:
        model.get_output_embeddings = inner.get_output_embeddings


def language_model_class(model: torch.nn.Module, layers: str) -> str | None:
    """A multimodal wrapper's language model: the class of the module holding its decoder layers; None for a
    text-only model."""
    config = getattr(model, "config", None)
    if config is None or not is_multimodal(config):
        return None
    return type(model.get_submodule(layers.rpartition(".")[0])).__name__
