"""Hooks that change a forward pass: skip a layer's branches, replace what a branch adds, run only some layers, feed
a residual into a layer or into the final norm."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from depthcache.model.capture import BranchHooks
from depthcache.model.structure import Structure, check_layer_subset, submodule


class Skip(BranchHooks):
    """Context manager: hooks making the skipped layers' branches add nothing to the residual where ``mask`` is set
    (the branch output becomes zero, or the residual it was given when the module adds that itself). ``sublayer``:
    ``layer`` (every branch), ``attn`` or ``mlp`` (every module of that role), or one branch module's path in the
    branch table (Falcon-H1's ``mamba`` alone)."""

    def __init__(self, model: torch.nn.Module, structure: Structure, layers: tuple[int, ...], sublayer: str,
                 mask: torch.Tensor) -> None:
        super().__init__(model, structure)
        self.layers, self.sublayer = layers, sublayer
        self.mask = mask.unsqueeze(-1)  # (batch, seq, 1)

    def __enter__(self) -> Skip:
        roles = {"layer": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}.get(self.sublayer)
        for layer in self.layers:
            if roles is not None:
                for branch in roles:
                    self.hook_branch(branch, layer, self._zero)
                continue
            role, part = self.structure.branch_part(self.sublayer, layer)
            self.hook_part(role, layer, part, self.branch_modules(role, layer)[part], self._zero)
        return self

    def _zero(self, layer: int, output: torch.Tensor, residual: torch.Tensor | None, part: int) -> torch.Tensor:
        mask = self.mask.reshape(*output.shape[:-1], 1)  # OPT's MLP output is (batch·seq, d)
        if residual is None:
            return output.masked_fill(mask, 0.0)
        return torch.where(mask, residual.reshape(output.shape), output)


class Replace(BranchHooks):
    """Context manager: branch ``branch`` (attn or mlp) of ``layer`` adds ``added`` (batch, seq, d) to the residual
    instead of what it computes; its (first) module's output is rebuilt from it (divided by the branch scale, plus
    the residual the module was given when it adds that itself), and any further module of the branch adds zero.
    ``branch`` may also name one branch module of the branch table: that module alone is replaced."""

    def __init__(self, model: torch.nn.Module, structure: Structure, layer: int, branch: str,
                 added: torch.Tensor) -> None:
        super().__init__(model, structure)
        self.layer, self.branch, self.added = layer, branch, added

    def __enter__(self) -> Replace:
        if self.branch in ("attn", "mlp"):
            self.role = self.branch
            self.hook_branch(self.branch, self.layer, self._replace)
        else:  # one branch module (Falcon-H1's mamba): it alone adds ``added``, its sibling modules run as they are
            self.role, part = self.structure.branch_part(self.branch, self.layer)
            self.hook_part(self.role, self.layer, part, self.branch_modules(self.role, self.layer)[part],
                           lambda layer, output, residual, _: self._replace(layer, output, residual, part, True))
        return self

    def _replace(self, layer: int, output: torch.Tensor, residual: torch.Tensor | None, part: int,
                 alone: bool = False) -> torch.Tensor:
        value = (self.added / self.structure.scale(self.role, layer, part)).to(output.dtype).reshape(output.shape)
        value = value if part == 0 or alone else torch.zeros_like(value)
        return value if residual is None else value + residual.reshape(output.shape)


@contextmanager
def only_layers(model: torch.nn.Module, structure: Structure, keep: list[int],
                hidden: torch.Tensor | None = None) -> Iterator[None]:
    """Run only the decoder layers ``keep`` (renumbered for the KV cache), feeding ``hidden`` into the first if given."""
    check_layer_subset(model, keep)
    parent, _, attr = structure.layers.rpartition(".")
    owner = submodule(model, parent)
    full = getattr(owner, attr)
    kept = [full[i] for i in keep]
    numbered = [(m, new) for new, layer in enumerate(kept) for m in layer.modules()
                if isinstance(getattr(m, "layer_idx", None), int)]
    original = [m.layer_idx for m, _ in numbered]
    handle = None
    if hidden is not None and keep[0] == 0 and structure.input_norm:  # RWKV: the stream starts after pre_ln
        handle = submodule(kept[0], structure.input_norm).register_forward_hook(lambda m, args, out: hidden)
    elif hidden is not None:
        handle = kept[0].register_forward_pre_hook(feeder(hidden), with_kwargs=True)
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


@contextmanager
def final_fed(model: torch.nn.Module, structure: Structure, hidden: torch.Tensor) -> Iterator[None]:
    """The final norm reads ``hidden`` instead of the residual leaving the last layer (``resid_final``)."""
    norm = submodule(model, structure.final_norm)
    handle = norm.register_forward_pre_hook(feeder(hidden), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
