"""Forward hooks that record, for one forward pass, the residual stream and what each sublayer adds to it.

Names follow TransformerLens: ``resid_pre[l]`` enters layer l, ``attn_out[l]`` and ``mlp_out[l]`` are
the vectors the two branches add, ``resid_final`` leaves the last layer (the final norm's input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from depthcache.model.architectures import Architecture, decoder_layers, submodule


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (attention modules return ``(out, weights)``)."""
    return output[0] if isinstance(output, tuple) else output


class Capture:
    """Context manager: hooks on the chosen layers; after a forward, ``records[name][layer]`` holds tensors."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, layers: Sequence[int],
                 sites: Sequence[str], dtype: torch.dtype | None = None, final: bool | None = None) -> None:
        self.model, self.arch, self.layers, self.sites = model, arch, tuple(layers), tuple(sites)
        self.final = "resid" in self.sites if final is None else final  # also record resid_final
        self.dtype = dtype  # cast as soon as captured: later stacking and gathering move half the bytes
        self.records: dict[str, dict[int, torch.Tensor]] = {"resid_pre": {}, "attn_out": {}, "mlp_out": {}}
        self.resid_final: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Capture:
        blocks = decoder_layers(self.model, self.arch)
        for layer in self.layers:
            block = blocks[layer]
            if "resid" in self.sites:
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
            if "attn" in self.sites:
                attn = submodule(block, self.arch.attn)
                self._handles.append(attn.register_forward_hook(self._out_hook("attn_out", layer)))
            if "mlp" in self.sites:
                mlp = submodule(block, self.arch.mlp)
                self._handles.append(mlp.register_forward_hook(self._out_hook("mlp_out", layer)))
        if self.final:
            norm = submodule(self.model, self.arch.final_norm)
            self._handles.append(norm.register_forward_pre_hook(self._final_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.records["resid_pre"][layer] = self._keep(hidden)
        return hook

    def _out_hook(self, name: str, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            self.records[name][layer] = self._keep(first_tensor(output))
        return hook

    def _final_hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.resid_final = self._keep(args[0])

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A detached copy in the capture dtype (no copy when the dtype already matches)."""
        return tensor.detach().to(self.dtype) if self.dtype is not None else tensor.detach()

    def stacked(self, name: str) -> torch.Tensor:
        """(layer, batch, seq, d_model) tensor of one recorded site, in stored-layer order."""
        return torch.stack([self.records[name][layer] for layer in self.layers])
