"""Model mechanics shared by erasure and integrated gradients: the clean run, and runs that start at a layer.

A run "from layer l" executes only decoder layers l..L−1 with a given residual fed into layer l (the clean run's
prefix is reused, layers < l are never recomputed), then the final norm and the unembedding at the answer positions.
A run from layer L feeds the given residual into the final norm instead (it replaces the final residual).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from depthcache.model.capture import Capture
from depthcache.model.skips import final_fed, only_layers
from depthcache.model.structure import Structure, structure_of
from depthcache.store.layout import PART_PREFIX, part_modules


class Prompt(Protocol):
    """What a restarted run needs of a prompt: its token ids and the answer tokens predicted at its end."""

    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    @property
    def n_answer(self) -> int: ...


@dataclass(frozen=True)
class Clean:
    """The unmodified run of a prompt: the residual entering every layer and the final one, what each branch adds,
    and the output distribution at the positions predicting answer tokens."""

    resid: torch.Tensor  # (layer + 1, position, d_model) in the model's dtype; row L: the final residual
    added: dict[str, torch.Tensor]  # "attn", "mlp": (layer, position, d_model) what each branch adds
    probs: torch.Tensor  # (n_answer, vocab) float32 next-token distribution where each answer token is predicted
    answer_prob: torch.Tensor  # (n_answer,) float32 probability of each answer token


def input_ids(model: torch.nn.Module, prompt: Prompt, batch: int) -> torch.Tensor:
    """(batch, positions) copies of the prompt's input ids on the model's device."""
    device = next(model.parameters()).device
    return torch.tensor(prompt.input_ids, device=device).unsqueeze(0).expand(batch, -1)


def answer_probs(logits: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """(batch, n_answer) float32 probability of each answer token from logits at the last n_answer positions."""
    ids = torch.tensor(prompt.answer_ids, device=logits.device)
    logp = torch.log_softmax(logits[:, -prompt.n_answer:].float(), dim=-1)
    return logp.gather(-1, ids.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1).exp()


def output_probs(logits: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """(batch, n_answer, vocab) float32 next-token distributions at the last n_answer positions."""
    return torch.softmax(logits[:, -prompt.n_answer:].float(), dim=-1)


@contextmanager
def contiguous_head(model: torch.nn.Module) -> Iterator[None]:
    """The output projection receives a contiguous input: transformers hands it the last ``logits_to_keep``
    positions as a strided view, which torch multiplies as a batched matmul against the broadcast weight, ten times
    slower than one matrix product on CPU (forward and backward)."""
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0].contiguous(),
                                                                                           *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def last_logits(model: torch.nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """(batch, keep, vocab) logits at the last ``keep`` positions of a forward of ``ids``."""
    with contiguous_head(model):
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits


def captured(model: torch.nn.Module, ids: torch.Tensor, keep: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One forward of ``ids`` (1, positions): the residual entering every layer then the final residual (layer + 1,
    positions, d), what each branch adds ({"attn", "mlp"}, and each module of a role a layer has several of: (layer,
    positions, d)), logits at the last ``keep``."""
    structure = structure_of(model)
    layers = range(structure.n_layers)
    parts = part_modules(structure.attn, structure.mlp)  # a role's modules apart, where a layer has several
    sites = ("resid", "attn", "mlp", *(PART_PREFIX + p for p in parts))
    with torch.inference_mode(), Capture(model, structure, layers, sites) as cap:
        logits = last_logits(model, ids, keep)
    resid = torch.stack([*(cap.records["resid_pre"][layer][0] for layer in layers), cap.resid_final[0]])
    names = {"attn": "attn_out", "mlp": "mlp_out"} | {p: PART_PREFIX + p for p in parts}
    added = {branch: torch.stack([cap.records[name][layer][0] for layer in layers]).clone()
             for branch, name in names.items()}
    return resid.clone(), added, logits


def clean_run(model: torch.nn.Module, prompt: Prompt) -> Clean:
    """Forward the prompt once, capturing the residual entering every layer, the final one and the branches."""
    resid, added, logits = captured(model, input_ids(model, prompt, 1), prompt.n_answer)
    return Clean(resid, added, output_probs(logits, prompt)[0], answer_probs(logits, prompt)[0])


def whole_sequence(model: torch.nn.Module, prompt: Prompt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The residuals (layer + 1, positions + 1, d) and branch outputs of prompt + the WHOLE answer: the input also
    holding the last answer token, which the teacher-forced input leaves out (it predicts nothing scored)."""
    ids = torch.tensor([*prompt.input_ids, prompt.answer_ids[-1]], device=next(model.parameters()).device)
    resid, added, _ = captured(model, ids.unsqueeze(0), 1)
    return resid, added


def logits_from(model: torch.nn.Module, structure: Structure, layer: int, hidden: torch.Tensor, prompt: Prompt
                ) -> torch.Tensor:
    """(batch, n_answer, vocab) logits when ``hidden`` (batch, positions, d) enters layer ``layer``; layer L: when
    ``hidden`` is the final residual (the final norm's input; the last layer's own output is discarded)."""
    ids = input_ids(model, prompt, hidden.shape[0])
    if layer < structure.n_layers:
        with only_layers(model, structure, list(range(layer, structure.n_layers)), hidden):
            return last_logits(model, ids, prompt.n_answer)
    with only_layers(model, structure, [structure.n_layers - 1]), final_fed(model, structure, hidden):
        return last_logits(model, ids, prompt.n_answer)


def run_from(model: torch.nn.Module, structure: Structure, layer: int, hidden: torch.Tensor, prompt: Prompt
             ) -> torch.Tensor:
    """(batch, n_answer) answer probabilities when ``hidden`` (batch, positions, d) enters layer ``layer`` (L: the
    final norm)."""
    return answer_probs(logits_from(model, structure, layer, hidden, prompt), prompt)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients (only the residual's gradient is wanted), restored afterwards (not the
    placeholders of a dispatched model's offloaded weights that its inference-mode forwards left: torch refuses to
    make those require gradients, and each forward replaces them anyway)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            if not p.is_inference():
                p.requires_grad_(True)
