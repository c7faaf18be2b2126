"""Forward hooks that record, for one forward pass, the residual stream and what each sublayer adds to it.

Names follow TransformerLens: ``resid_pre[l]`` enters layer l, ``attn_out[l]`` and ``mlp_out[l]`` are
the vectors the layer's token mixers and channel mixers add (summed where a layer has several, zero where it has
none), ``resid_final`` leaves the last layer (the final norm's input). What a branch adds
comes from the discovered Structure: the branch module's output (or its post-norm's), less the residual it was given
when it adds that itself (BLOOM), times the layer's branch scale (Granite), in the layer input's shape (OPT's MLP
returns flattened tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from depthcache.model.structure import (
    Structure,
    decoder_layers,
    first_input,
    first_tensor,
    residual_argument,
    submodule,
)
from depthcache.store.layout import PART_PREFIX, is_part


class BranchHooks:
    """Base of the hook sets on the branch modules: the layer input's shape and each branch's residual argument."""

    def __init__(self, model: torch.nn.Module, structure: Structure) -> None:
        self.model, self.structure = model, structure
        self.shapes: dict[int, torch.Size] = {}
        self.dtypes: dict[int, torch.dtype] = {}
        self.residuals: dict[tuple[str, int, int], torch.Tensor | None] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def branch_modules(self, branch: str, layer: int) -> list[torch.nn.Module]:
        """The modules whose outputs branch ``attn``/``mlp`` of ``layer`` adds (none, one or several)."""
        block = decoder_layers(self.model, self.structure)[layer]
        return [submodule(block, path) for path in self.structure.paths(branch, layer)]

    def adds_residual(self, branch: str) -> bool:
        """The branch module returns residual + what it adds (BLOOM)."""
        return self.structure.attn_adds_residual if branch == "attn" else self.structure.mlp_adds_residual

    def hook_layer(self, layer: int) -> None:
        """Remember the shape of the hidden states entering ``layer``."""
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = first_input(args, kwargs)
            self.shapes[layer], self.dtypes[layer] = hidden.shape, hidden.dtype
        block = decoder_layers(self.model, self.structure)[layer]
        self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))

    def hook_branch(self, branch: str, layer: int, on_output: Any) -> None:
        """Call ``on_output(layer, output, residual, part)`` after each module of the branch runs (residual: None
        unless it adds one; part: the module's index among the layer's modules of that branch, in call order); a
        non-None return replaces the module's first output."""
        for part, module in enumerate(self.branch_modules(branch, layer)):
            self.hook_part(branch, layer, part, module, on_output)

    def hook_part(self, branch: str, layer: int, part: int, module: torch.nn.Module, on_output: Any) -> None:
        """Hook one module of a branch (see ``hook_branch``)."""
        key = (branch, layer, part)
        if self.adds_residual(branch):
            def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                self.residuals[key] = residual_argument(module, args, kwargs)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

        def post(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            replaced = on_output(layer, first_tensor(output), self.residuals.pop(key, None), part)
            if replaced is None:
                return None
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced
        self._handles.append(module.register_forward_hook(post))

    def added(self, layer: int, output: torch.Tensor, residual: torch.Tensor | None, role: str, part: int
              ) -> torch.Tensor:
        """What a branch module adds to the residual, from its output: less the residual it was given (BLOOM), times
        the branch's scale (Granite, Falcon-H1), in the layer input's shape (OPT)."""
        added = output if residual is None else output - residual
        scale = self.structure.scale(role, layer, part)
        if scale != 1.0:
            added = added * scale
        return added.reshape(self.shapes[layer])

    def recorder(self, name: str, role: str, alone: bool = False) -> Any:
        """The branch callback that hands what a module of ``role`` adds to the subclass's ``_record`` for array
        ``name``: summed over the role's modules, or ``alone`` (a part array holds one module)."""
        def hook(layer: int, output: torch.Tensor, residual: torch.Tensor | None, part: int) -> None:
            self._record(name, layer, self.added(layer, output, residual, role, part), add=part > 0 and not alone)
        return hook

    def module_of(self, path: str, layer: int) -> tuple[str, int] | None:
        """(role, index) of branch module ``path`` in layer ``layer``, None where the layer has no such module."""
        for role in ("attn", "mlp"):
            if path in self.structure.paths(role, layer):
                return role, self.structure.paths(role, layer).index(path)
        return None

    def register(self, layers: Sequence[int], names: Sequence[str]) -> None:
        """Hook the arrays ``names`` of ``layers`` with the subclass's ``_pre_hook``, ``_record`` (branch sums,
        part arrays ``part_<module>``), ``_absent_hook`` and ``_final_hook``."""
        blocks = decoder_layers(self.model, self.structure)
        for layer in layers:
            self.hook_layer(layer)
            if "resid_pre" in names and layer == 0 and self.structure.input_norm:  # RWKV: after layer 0's pre_ln
                record = self._pre_hook(0)
                norm = submodule(blocks[0], self.structure.input_norm)
                self._handles.append(norm.register_forward_hook(lambda m, args, out: record(m, (out,), {})))
            elif "resid_pre" in names:
                self._handles.append(blocks[layer].register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
            for branch in ("attn", "mlp"):
                if f"{branch}_out" not in names:
                    continue
                if self.structure.paths(branch, layer):
                    self.hook_branch(branch, layer, self.recorder(f"{branch}_out", branch))
                else:  # the layer has no such branch: it adds exactly zero
                    self._handles.append(blocks[layer].register_forward_pre_hook(
                        self._absent_hook(f"{branch}_out", layer), with_kwargs=True))
            for name in (n for n in names if is_part(n)):
                found = self.module_of(name.removeprefix(PART_PREFIX), layer)
                if found is None:
                    self._handles.append(blocks[layer].register_forward_pre_hook(
                        self._absent_hook(name, layer), with_kwargs=True))
                else:
                    role, part = found
                    self.hook_part(role, layer, part, self.branch_modules(role, layer)[part],
                                   self.recorder(name, role, alone=True))
        if "resid_final" in names:
            norm = submodule(self.model, self.structure.final_norm)
            self._handles.append(norm.register_forward_pre_hook(self._final_hook, with_kwargs=True))

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Capture(BranchHooks):
    """Context manager: hooks on the chosen layers; after a forward, ``records[name][layer]`` holds tensors."""

    def __init__(self, model: torch.nn.Module, structure: Structure, layers: Sequence[int],
                 sites: Sequence[str], dtype: torch.dtype | None = None, final: bool | None = None) -> None:
        """``sites``: resid, attn, mlp, and any ``part_<module>`` (one branch module's part alone)."""
        super().__init__(model, structure)
        self.layers, self.sites = tuple(layers), tuple(sites)
        self.final = "resid" in self.sites if final is None else final  # also record resid_final
        self.dtype = dtype  # cast as soon as captured: later stacking and gathering move half the bytes
        self.records: dict[str, dict[int, torch.Tensor]] = {"resid_pre": {}, "attn_out": {}, "mlp_out": {}}
        self.resid_final: torch.Tensor | None = None

    def __enter__(self) -> Capture:
        names = [{"resid": "resid_pre", "attn": "attn_out", "mlp": "mlp_out"}.get(site, site) for site in self.sites]
        self.register(self.layers, [*names, *(["resid_final"] if self.final else [])])
        return self

    def _pre_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.records["resid_pre"][layer] = self._keep(first_input(args, kwargs))
        return hook

    def _record(self, name: str, layer: int, added: torch.Tensor, add: bool) -> None:
        added = self._keep(added)
        self.records.setdefault(name, {})[layer] = self.records[name][layer] + added if add else added

    def _absent_hook(self, name: str, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = first_input(args, kwargs)
            self.records.setdefault(name, {})[layer] = torch.zeros(hidden.shape, dtype=self.dtype or hidden.dtype,
                                                    device=hidden.device)
        return hook

    def _final_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.resid_final = self._keep(first_input(args, kwargs))

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A detached copy in the capture dtype: always a copy, as some layers add into a branch's output in place
        (Falcon adds the attention output into the MLP's)."""
        if self.dtype is not None and tensor.dtype != self.dtype:
            return tensor.detach().to(self.dtype)
        return tensor.detach().clone()

    def stacked(self, name: str) -> torch.Tensor:
        """(layer, batch, seq, d_model) tensor of one recorded site, in stored-layer order."""
        return torch.stack([self.records[name][layer] for layer in self.layers])


Runs = tuple[tuple[int, int, int], ...]  # (first source row, last source row + 1, first target row) of a selection


class CaptureInto(BranchHooks):
    """Context manager: hooks copy each captured (batch, seq, d_model) tensor's selected token rows straight into
    preallocated targets, casting to the target's dtype in the same pass (no stacking, gathering or second copy).
    What each site holds is what ``Capture`` records.

    ``names`` are the arrays captured (``resid_pre``, ``attn_out``, ``mlp_out``, ``resid_final``). Before each forward
    pass ``into(targets, runs)`` says where they go: (stored layer, token, d_model) tensors for the per-layer arrays,
    (token, d_model) for ``resid_final``, and the rows of the flattened batch × seq axis to keep (``token_runs``).
    """

    def __init__(self, model: torch.nn.Module, structure: Structure, layers: Sequence[int],
                 names: Sequence[str]) -> None:
        super().__init__(model, structure)
        self.layers, self.names = tuple(layers), tuple(names)
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.targets: dict[str, torch.Tensor] = {}
        self.runs: Runs = ()

    def into(self, targets: dict[str, torch.Tensor], runs: Runs) -> None:
        """Where the next forward pass's activations go."""
        self.targets, self.runs = targets, runs

    def __enter__(self) -> CaptureInto:
        self.register(self.layers, self.names)
        return self

    def _pre_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._copy(first_input(args, kwargs), self.targets["resid_pre"][self.index[layer]])
        return hook

    def _record(self, name: str, layer: int, added: torch.Tensor, add: bool) -> None:
        self._copy(added, self.targets[name][self.index[layer]], add=add)

    def _absent_hook(self, name: str, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            target = self.targets[name][self.index[layer]]
            for first, last, at in self.runs:
                target[at:at + last - first].zero_()
        return hook

    def _final_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._copy(first_input(args, kwargs), self.targets["resid_final"])

    def _copy(self, tensor: torch.Tensor, target: torch.Tensor, add: bool = False) -> None:
        """Copy the kept rows of ``tensor`` (batch, seq, d) into ``target`` (token, d), cast on the way (a copy made
        now, so a layer that later adds into this tensor in place cannot change it); with ``add``, add them to what
        an earlier module of the same branch put there."""
        flat = tensor.detach().reshape(-1, tensor.shape[-1])
        for first, last, at in self.runs:
            if add:
                target[at:at + last - first].add_(flat[first:last].to(target.device, target.dtype))  # waits
            else:
                target[at:at + last - first].copy_(flat[first:last], non_blocking=True)


def token_runs(lengths: Sequence[int], seq_len: int, drop: int, keep: int) -> Runs:
    """The rows of a right-padded (len(lengths), seq_len) batch, flattened, that hold real tokens ``drop`` to
    ``drop + keep`` (in order), as maximal contiguous runs (first row, last row + 1, first target row)."""
    runs: list[list[int]] = []
    skipped = taken = 0
    for row, length in enumerate(lengths):
        skip = min(length, drop - skipped)
        skipped += skip
        take = min(length - skip, keep - taken)
        if take <= 0:
            continue
        first = row * seq_len + skip
        if runs and runs[-1][1] == first:
            runs[-1][1] += take
        else:
            runs.append([first, first + take, taken])
        taken += take
    return tuple((a, b, c) for a, b, c in runs)
