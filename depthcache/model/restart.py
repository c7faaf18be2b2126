"""Model mechanics shared by erasure and integrated gradients: the clean run, and runs that start at a layer.

A run "from layer l" executes only decoder layers l..L−1 with a given residual fed into layer l (the clean run's
prefix is reused, layers < l are never recomputed), then the final norm and the unembedding at the answer positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from depthcache.model.capture import Capture
from depthcache.model.skips import only_layers
from depthcache.model.structure import Structure, structure_of


class Prompt(Protocol):
    """What a restarted run needs of a prompt: its token ids and the answer tokens predicted at its end."""

    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    @property
    def n_answer(self) -> int: ...


@dataclass(frozen=True)
class Clean:
    """The unmodified run of a prompt: residual entering every layer and the answer tokens' probabilities."""

    resid: torch.Tensor  # (layer, position, d_model) in the model's dtype
    answer_prob: torch.Tensor  # (n_answer,) float32


def input_ids(model: torch.nn.Module, prompt: Prompt, batch: int) -> torch.Tensor:
    """(batch, positions) copies of the prompt's input ids on the model's device."""
    device = next(model.parameters()).device
    return torch.tensor(prompt.input_ids, device=device).unsqueeze(0).expand(batch, -1)


def answer_probs(logits: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """(batch, n_answer) float32 probability of each answer token from logits at the last n_answer positions."""
    ids = torch.tensor(prompt.answer_ids, device=logits.device)
    logp = torch.log_softmax(logits[:, -prompt.n_answer:].float(), dim=-1)
    return logp.gather(-1, ids.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1).exp()


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


def clean_run(model: torch.nn.Module, prompt: Prompt) -> Clean:
    """Forward the prompt once, capturing the residual entering every layer."""
    structure = structure_of(model)
    layers = range(structure.n_layers)
    with torch.inference_mode(), Capture(model, structure, layers, ("resid",)) as cap:
        logits = last_logits(model, input_ids(model, prompt, 1), prompt.n_answer)
    resid = torch.stack([cap.records["resid_pre"][layer][0] for layer in layers])
    return Clean(resid.clone(), answer_probs(logits, prompt)[0])


def run_from(model: torch.nn.Module, structure: Structure, layer: int, hidden: torch.Tensor, prompt: Prompt
             ) -> torch.Tensor:
    """(batch, n_answer) answer probabilities when ``hidden`` (batch, positions, d) enters layer ``layer``."""
    ids = input_ids(model, prompt, hidden.shape[0])
    with only_layers(model, structure, list(range(layer, structure.n_layers)), hidden):
        logits = last_logits(model, ids, prompt.n_answer)
    return answer_probs(logits, prompt)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients (only the residual's gradient is wanted), restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
