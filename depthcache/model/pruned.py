"""A copy of a model with some decoder layers removed, saved as a local Hugging Face folder (same tokenizer).

Used to make a shallow model whose alignment with the original is known (layer k of an every-other copy is the
original's layer 2k), e.g. for the layer-map check. The copy reloads with ``from_pretrained``: the layer count in the
config, per-layer config lists (``layer_types``) and each attention module's ``layer_idx`` follow the kept layers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from depthcache.errors import DepthcacheError
from depthcache.layerspec import parse_layers
from depthcache.model.loading import load_model
from depthcache.model.structure import (
    LAYER_COUNT_KEYS,
    check_layer_subset,
    decoder_layers,
    remember,
    structure_of,
    submodule,
)

PRUNED_ATTR = "depthcache_pruned_from"


def kept_layers(keep: str, n_layers: int) -> tuple[int, ...]:
    """'every-other' (layers 0, 2, 4, …) or a layer spec such as '0-9,20' → the sorted layers to keep."""
    layers = tuple(range(0, n_layers, 2)) if keep == "every-other" else parse_layers(keep, n_layers)
    if not layers:
        raise DepthcacheError(f"--keep {keep!r} keeps no layer of the {n_layers}")
    return layers


def prune_model(model: torch.nn.Module, keep: tuple[int, ...]) -> torch.nn.Module:
    """Remove every decoder layer not in ``keep`` in place, renumbering layer indices and the config."""
    structure = structure_of(model)
    check_layer_subset(model, keep)
    layers = decoder_layers(model, structure)
    kept = torch.nn.ModuleList(layers[i] for i in keep)
    parent_path, _, name = structure.layers.rpartition(".")
    setattr(submodule(model, parent_path), name, kept)
    remember(model, structure.pruned(keep))
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config.get_text_config()
    n_before = len(layers)
    for key in LAYER_COUNT_KEYS:
        if getattr(config, key, None) == n_before:
            setattr(config, key, len(keep))
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == n_before:
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


@contextmanager
def removed_layers(model: torch.nn.Module, removed: Iterable[int]) -> Iterator[tuple[int, ...]]:
    """The model with the ``removed`` decoder layers taken out (as ``prune_model`` does: layer indices, layer count,
    per-layer config and the recorded structure renumbered, so KV caches and ``generate`` see a shallower model);
    restored on exit. Yields the kept layers."""
    structure = structure_of(model)
    layers = decoder_layers(model, structure)
    gone = set(removed)
    keep = tuple(i for i in range(len(layers)) if i not in gone)
    if not keep:
        raise DepthcacheError(f"removing layers {sorted(gone)} leaves none of the {len(layers)}")
    if not gone:
        yield keep
        return
    check_layer_subset(model, keep)
    parent_path, _, name = structure.layers.rpartition(".")
    parent, config = submodule(model, parent_path), model.config.get_text_config()
    saved_config = {key: getattr(config, key) for key in (*LAYER_COUNT_KEYS, "layer_types") if hasattr(config, key)}
    saved_idx = [(m, m.layer_idx) for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")]
    prune_model(model, keep)
    try:
        yield keep
    finally:
        setattr(parent, name, layers)
        remember(model, structure)
        for module, index in saved_idx:
            module.layer_idx = index
        for key, value in saved_config.items():
            setattr(config, key, value)


def prune_copy(model_spec: str, keep: str, out: str) -> Path:
    """Load ``model_spec``, keep only the layers named by ``keep``, save model and tokenizer to the folder ``out``."""
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise DepthcacheError(f"{out} already exists and is not empty: choose another --out or remove it")
    loaded = load_model(model_spec, device="cpu", dtype=torch.float32)
    depth = structure_of(loaded.model).n_layers
    layers = kept_layers(keep, depth)
    model = prune_model(loaded.model, layers)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    (folder / f"{PRUNED_ATTR}.json").write_text(json.dumps(
        {"model": loaded.provenance, "n_layers": depth, "kept_layers": list(layers)}, indent=1, default=str))
    return folder
