"""Likelihood scoring (lm-evaluation-harness style): log-prob of the gold continuation and accuracy among choices.

Each batch runs its prompts once (a shared few-shot prefix once for all), keeps the KV cache, then scores every
candidate continuation on top of it, cropping the cache back to the prompts after each candidate.
"""

from __future__ import annotations

import numpy as np
import torch

from depthcache.evaluate.encoding import cache_argument, encode_continuation, pad_id, right_padded, run_prompts
from depthcache.tasks import TaskItem


def candidates(item: TaskItem) -> tuple[str, ...]:
    """The continuations scored for an item: its choices, or only the gold answer."""
    return item.choices or (item.answer,)


def batch_scores(model: torch.nn.Module, tokenizer, items: list[TaskItem],  # noqa: ANN001 - any HF tokenizer
                 device: str) -> list[np.ndarray]:
    """Summed log-prob of every candidate continuation of each item, given its prompt."""
    pad = pad_id(tokenizer)
    conts = [[encode_continuation(tokenizer, it.prompt, c) for c in candidates(it)] for it in items]
    scores = [np.zeros(len(c)) for c in conts]
    with torch.inference_mode():
        prompts = run_prompts(model, tokenizer, [it.prompt for it in items], device)
        cache, mask, lengths = prompts.cache, prompts.mask, prompts.next_position
        first = torch.log_softmax(prompts.last_logits.float(), dim=-1)
        for j in range(max(len(c) for c in conts)):
            seqs = [c[j] if j < len(c) else c[0] for c in conts]
            cont, cont_mask = right_padded(seqs, pad, device)
            logits = model(input_ids=cont, attention_mask=torch.cat([mask, cont_mask], dim=1),
                           position_ids=lengths + torch.arange(cont.shape[1], device=device), use_cache=True,
                           **cache_argument(model, cache)).logits
            logp = torch.cat([first.unsqueeze(1), torch.log_softmax(logits[:, :-1].float(), dim=-1)], dim=1)
            picked = (logp.gather(-1, cont.unsqueeze(-1)).squeeze(-1) * cont_mask).sum(-1)
            for row, c in enumerate(conts):
                if j < len(c):
                    scores[row][j] = float(picked[row])
            cache.crop(-cont.shape[1])
    return scores


def score_likelihood(model: torch.nn.Module, tokenizer, items: list[TaskItem],  # noqa: ANN001
                     batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Per item: log-prob of the gold answer (nats), and 1/0 whether it scores highest among the choices (NaN if none)."""
    gold, correct = np.empty(len(items)), np.full(len(items), np.nan)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        for i, (item, s) in enumerate(zip(batch, batch_scores(model, tokenizer, batch, device)), start=start):
            answer = candidates(item).index(item.answer)
            gold[i] = s[answer]
            if item.choices:
                correct[i] = float(int(np.argmax(s)) == answer)
    return gold, correct
