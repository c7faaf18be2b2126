"""Hooks that change a forward pass: skip a layer's branches, run only some layers, feed a residual into a layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from depthcache.model.architectures import Architecture, decoder_layers, submodule
from depthcache.model.capture import first_tensor


class Skip:
    """Context manager: hooks zeroing what the skipped layers' branches add to the residual where ``mask`` is set."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, layers: tuple[int, ...], sublayer: str,
                 mask: torch.Tensor) -> None:
        self.model, self.arch, self.layers, self.sublayer = model, arch, layers, sublayer
        self.mask = mask.unsqueeze(-1)  # (batch, seq, 1)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Skip:
        blocks = decoder_layers(self.model, self.arch)
        branches = {"layer": (self.arch.attn, self.arch.mlp), "attn": (self.arch.attn,), "mlp": (self.arch.mlp,)}
        for layer in self.layers:
            for branch in branches[self.sublayer]:
                module = submodule(blocks[layer], branch)
                self._handles.append(module.register_forward_hook(self._zero))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _zero(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        out = first_tensor(output).masked_fill(self.mask, 0.0)
        return (out, *output[1:]) if isinstance(output, tuple) else out



@contextmanager
def only_layers(model: torch.nn.Module, arch: Architecture, keep: list[int],
                hidden: torch.Tensor | None = None) -> Iterator[None]:
    """Run only the decoder layers ``keep`` (renumbered for the KV cache), feeding ``hidden`` into the first if given."""
    parent, _, attr = arch.layers.rpartition(".")
    owner = submodule(model, parent)
    full = getattr(owner, attr)
    kept = [full[i] for i in keep]
    numbered = [(m, new) for new, layer in enumerate(kept) for m in layer.modules()
                if isinstance(getattr(m, "layer_idx", None), int)]
    original = [m.layer_idx for m, _ in numbered]
    handle = kept[0].register_forward_pre_hook(feeder(hidden), with_kwargs=True) if hidden is not None else None
    setattr(owner, attr, torch.nn.ModuleList(kept))
    for m, new in numbered:
        m.layer_idx = new
    try:
        yield
    finally:
        setattr(owner, attr, full)
        for (m, _), idx in zip(numbered, original):
            m.layer_idx = idx
        if handle is not None:
            handle.remove()



def feeder(hidden: torch.Tensor):  # noqa: ANN201 - torch hook
    """A forward pre-hook replacing a decoder layer's input hidden states by ``hidden``."""
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook
