"""Generation scoring: greedy decoding until a newline (or EOS), exact match of the parsed answer."""

from __future__ import annotations

import numpy as np
import torch

from depthcache.evaluate.encoding import cache_argument, returned_cache, run_prompts
from depthcache.tasks import TaskItem

STOP = "\n"
PUNCTUATION = ".,;:!?\"'"


def finished(text: str, words: int) -> bool:
    """True once a continuation holds a newline, or more than the ``words`` the parsed answer reads."""
    return STOP in text or len(text.split()) > words


def greedy(model: torch.nn.Module, tokenizer, prompts: list[str], words: list[int],  # noqa: ANN001
           max_new_tokens: int, device: str) -> list[str]:
    """The greedy continuation of each prompt, up to the first newline, EOS, the first word after the ``words``
    words the answer parser reads, or ``max_new_tokens`` tokens."""
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.inference_mode():
        start = run_prompts(model, tokenizer, prompts, device)
        logits, cache, mask, position = start.last_logits, start.cache, start.mask, start.next_position
        for _ in range(max_new_tokens):
            token = logits.argmax(-1)
            for row, t in enumerate(token.tolist()):
                if not done[row]:
                    generated[row].append(t)
                    done[row] = t == tokenizer.eos_token_id or finished(tokenizer.decode(generated[row]), words[row])
            if all(done):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position,
                        use_cache=True, **cache_argument(model, cache))
            logits, cache, position = out.logits[:, -1], returned_cache(out), position + 1
    return [tokenizer.decode(g, skip_special_tokens=True).split(STOP, 1)[0] for g in generated]


def normalise(text: str) -> str:
    """Whitespace-trimmed, end punctuation stripped, case-folded."""
    return text.strip().strip(PUNCTUATION).strip().casefold()


def parse_answer(generated: str, gold: str) -> str:
    """The model's answer: the first line's first as many words as the gold answer has, normalised."""
    return normalise(" ".join(generated.split(STOP, 1)[0].split()[:len(gold.split())]))


def score_generation(model: torch.nn.Module, tokenizer, items: list[TaskItem], batch_size: int,  # noqa: ANN001
                     max_new_tokens: int, device: str) -> tuple[np.ndarray, list[str]]:
    """Per item: 1/0 exact match of the parsed greedy answer with the gold answer, and the generated text."""
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        texts += greedy(model, tokenizer, [it.prompt for it in batch], [len(it.answer.split()) for it in batch],
                        max_new_tokens, device)
    match = np.array([float(parse_answer(t, it.answer) == normalise(it.answer)) for t, it in zip(texts, items)])
    return match, texts
