"""Prompts and continuations as token ids, left-padded batches whose last column is every prompt's end, the prompt
pass (a token prefix common to a batch, such as few-shot examples, run once and shared), and the KV cache handed
back to the next incremental forward."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from depthcache.extraction.windows import bos_token_id


def encode_prompt(tokenizer, prompt: str) -> list[int]:  # noqa: ANN001 - any HF tokenizer
    """Token ids of a prompt, with BOS first when the tokenizer prepends one by default (as in extraction)."""
    bos = bos_token_id(tokenizer)
    return ([bos] if bos is not None else []) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_continuation(tokenizer, prompt: str, continuation: str) -> list[int]:  # noqa: ANN001
    """Token ids of ``continuation`` after ``prompt``: the tail of the joint tokenization (as lm-evaluation-harness
    does), or the continuation alone when the joint tokens do not start with the prompt's."""
    alone = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    joint = list(tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"])
    if joint[:len(alone)] == alone and len(joint) > len(alone):
        return joint[len(alone):]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer) -> int:  # noqa: ANN001 - any HF tokenizer
    """The id used for padding (masked out, so any id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def left_padded(seqs: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and position ids (0 at each sequence's first real token), padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_padded(seqs: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of continuations padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def cache_argument(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache under the keyword this transformers release's forward takes: ``cache`` (5.2x) or the older
    ``past_key_values`` (deprecated there, with a warning)."""
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    return {"cache" if takes_cache else "past_key_values": cache}


def last_logits_only(model: torch.nn.Module) -> dict[str, Any]:
    """The forward keyword that computes logits for the last position only (``logits_to_keep=1``) where the model
    takes it: a prompt pass needs no others, and with a 150k-word head the rest cost more than the layers."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned: the ``cache`` field where the output has one (5.2x, where reading
    ``past_key_values`` is deprecated and logs a warning), else ``past_key_values``."""
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
    return out.cache if "cache" in names else out.past_key_values


SHARED_PREFIX_MIN = 8  # tokens: a shorter prefix common to a batch is not worth a pass of its own


@dataclass
class PromptPass:
    """A batch of prompts after one forward: the logits after each prompt's last token, the KV cache, the attention
    mask over the cached positions and each row's next position id."""

    last_logits: torch.Tensor  # (batch, vocab)
    cache: Any
    mask: torch.Tensor  # (batch, cached positions), 1 where a real token is cached
    next_position: torch.Tensor  # (batch, 1)


def common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all ``seqs`` share, leaving at least one token of each to run after them."""
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest - 1 and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def run_prompts(model: torch.nn.Module, tokenizer, prompts: list[str], device: str) -> PromptPass:  # noqa: ANN001
    """The prompts through the model once, keeping the KV cache. When they share a prefix of SHARED_PREFIX_MIN or
    more tokens (few-shot examples), it runs once and its cache is repeated for every row; the rest runs left-padded
    after it (positions continue from the prefix; the padding sits between the two and is masked out)."""
    seqs = [encode_prompt(tokenizer, p) for p in prompts]
    shared = common_prefix(seqs) if len(seqs) > 1 else 0
    cache_kw: dict[str, Any] = {}
    if shared >= SHARED_PREFIX_MIN:
        prefix = torch.tensor([seqs[0][:shared]], device=device)
        cache = returned_cache(model(input_ids=prefix, use_cache=True, **last_logits_only(model)))
        if hasattr(cache, "batch_repeat_interleave"):  # transformers' caches; anything else runs whole prompts
            cache.batch_repeat_interleave(len(seqs))
            cache_kw = cache_argument(model, cache)
            seqs = [s[shared:] for s in seqs]
    ids, mask, positions = left_padded(seqs, pad_id(tokenizer), device)
    if cache_kw:
        mask = torch.cat([torch.ones((len(seqs), shared), dtype=mask.dtype, device=mask.device), mask], dim=1)
        positions = positions + shared
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **last_logits_only(model), **cache_kw)
    return PromptPass(out.logits[:, -1], returned_cache(out), mask, mask.sum(-1, keepdim=True))
