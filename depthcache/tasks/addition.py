"""``addition``: few-shot n-digit addition, ``What is 23+58? Answer:`` → `` 81``."""

from __future__ import annotations

import random

from depthcache.tasks.base import (
    TaskItem,
    check_count,
    item_rng,
    require_int,
    with_distractors,
)

DESCRIPTION = "n-digit addition after 3 solved examples ('What is 23+58? Answer:' -> ' 81'); option digits=2"
DEFAULT_SEED = 0
DEFAULT_N = 200
N_SHOTS = 3


def question(a: int, b: int) -> str:
    """The question line for a + b, without the answer."""
    return f"What is {a}+{b}? Answer:"


def near_misses(value: int) -> list[int]:
    """Plausible wrong sums (±1, ±2, ±10, ±100, adjacent digits swapped), at most one digit longer or shorter."""
    text = str(value)
    swaps = [int(text[:i] + text[i + 1] + text[i] + text[i + 2:]) for i in range(len(text) - 1)
             if not (i == 0 and text[1] == "0")]
    offsets = [value + d for d in (-100, -10, -2, -1, 1, 2, 10, 100)]
    return sorted({v for v in swaps + offsets if v >= 0 and v != value and abs(len(str(v)) - len(text)) <= 1})


def numeric_choices(value: int, rng: random.Random) -> tuple[str, ...]:
    """The gold sum and three near misses, each written as an answer (leading space)."""
    return with_distractors(f" {value}", [f" {v}" for v in near_misses(value)], rng)


def operand_range(digits: int) -> tuple[int, int]:
    """Smallest and largest operand with exactly ``digits`` digits (0..9 for one digit)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1


def distinct_pairs(count: int, digits: int, rng: random.Random) -> list[tuple[int, int]]:
    """``count`` distinct operand pairs, drawn in a seeded order."""
    low, high = operand_range(digits)
    seen: dict[tuple[int, int], None] = {}
    while len(seen) < count:
        seen.setdefault((rng.randint(low, high), rng.randint(low, high)))
    return list(seen)


def generate(n: int | None, seed: int, digits: int = 2) -> list[TaskItem]:
    """``n`` distinct addition problems with ``digits``-digit operands, sharing one few-shot prefix."""
    require_int("digits", digits, 1, 30)
    n = DEFAULT_N if n is None else n
    low, high = operand_range(digits)
    check_count(n, (high - low + 1) ** 2 - N_SHOTS, f"distinct {digits}-digit addition problems")
    pairs = distinct_pairs(N_SHOTS + n, digits, random.Random(seed))
    prefix = "".join(f"{question(a, b)} {a + b}\n" for a, b in pairs[:N_SHOTS])
    items = []
    for i, (a, b) in enumerate(pairs[N_SHOTS:]):
        item_id = f"addition-{digits}d-{i:04d}"
        items.append(TaskItem(id=item_id, prompt=prefix + question(a, b), answer=f" {a + b}",
                              choices=numeric_choices(a + b, item_rng(seed, item_id)), hops=1,
                              meta={"operands": [a, b], "question": question(a, b)}))
    return items
