"""The task item type and the small seeded helpers every task generator shares.

Answer-space convention for the built-in tasks: a prompt never ends in whitespace and the answer carries
the single leading space that separates it from the prompt in natural text (``"... city of"`` + ``" Paris"``),
so ``prompt + answer`` is the text a model would read and every choice is a drop-in alternative for ``answer``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from depthcache.errors import DepthcacheError

N_DISTRACTORS = 3


@dataclass(frozen=True)
class TaskItem:
    """One prompt with its gold continuation, optional multiple-choice alternatives and composition depth."""

    id: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    hops: int = 1
    meta: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        problem = item_problem(self)
        if problem:
            raise DepthcacheError(f"task item {self.id!r}: {problem}")


def item_problem(item: TaskItem) -> str | None:
    """What makes ``item`` invalid, or None when it is well formed."""
    for name in ("id", "prompt", "answer"):
        value = getattr(item, name)
        if not isinstance(value, str) or not value:
            return f"'{name}' must be a non-empty string, got {value!r}"
    if not all(isinstance(c, str) and c for c in item.choices):
        return f"'choices' must be non-empty strings, got {list(item.choices)!r}"
    if item.choices and item.answer not in item.choices:
        return f"'choices' {list(item.choices)!r} must include the answer {item.answer!r}"
    if len(set(item.choices)) != len(item.choices):
        return f"'choices' {list(item.choices)!r} must be distinct"
    if isinstance(item.hops, bool) or not isinstance(item.hops, int) or item.hops < 1:
        return f"'hops' must be an integer >= 1, got {item.hops!r}"
    if not isinstance(item.meta, dict):
        return f"'meta' must be an object (dict), got {type(item.meta).__name__}"
    return None


def item_rng(seed: int, item_id: str) -> random.Random:
    """A generator private to one item, so its choices do not depend on which other items were drawn."""
    return random.Random(f"{seed}:{item_id}")


def with_distractors(gold: str, candidates: Sequence[str], rng: random.Random) -> tuple[str, ...]:
    """Gold plus ``N_DISTRACTORS`` distinct candidates other than gold, in a seeded order."""
    pool = sorted(set(candidates) - {gold})
    if len(pool) < N_DISTRACTORS:
        raise DepthcacheError(f"only {len(pool)} distractors for {gold!r}; need {N_DISTRACTORS}: add more "
                              f"alternatives of the same kind")
    choices = [gold, *rng.sample(pool, N_DISTRACTORS)]
    rng.shuffle(choices)
    return tuple(choices)


def require_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` when it is an integer in [low, high]; otherwise a DepthcacheError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise DepthcacheError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def check_count(n: int, available: int, what: str) -> None:
    """Refuse an ``n`` that is not a positive integer or exceeds what the task can provide."""
    require_int("n", n, 1)
    if n > available:
        raise DepthcacheError(f"n={n} is more than the {available} {what} available; ask for n <= {available}")


def subset_indices(total: int, n: int | None, seed: int, what: str) -> list[int]:
    """Indices of a seeded subset of size ``n`` (all when None) in order; a larger n keeps a smaller n's picks."""
    if n is None:
        return list(range(total))
    check_count(n, total, what)
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return sorted(order[:n])
