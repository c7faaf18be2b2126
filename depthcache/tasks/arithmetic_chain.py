"""``arithmetic-chain``: sums of single digits with k = 1..max_ops additions, ``5+7+5+3 =`` → `` 20`` (hops = k)."""

from __future__ import annotations

import random

from depthcache.errors import DepthcacheError
from depthcache.tasks.addition import numeric_choices
from depthcache.tasks.base import TaskItem, item_rng, require_int

DESCRIPTION = ("single-digit chains with k = 1..4 additions ('5+7+5+3 =' -> ' 20'), hops = k, after 3 solved "
               "examples; option max_ops=4")
DEFAULT_SEED = 0
DEFAULT_N = 200
N_SHOTS = 3
DIGITS = range(1, 10)


def expression(operands: tuple[int, ...]) -> str:
    """The question line for a chain, without the answer: ``5+7+5+3 =``."""
    return "+".join(map(str, operands)) + " ="


def random_chain(ops: int, rng: random.Random) -> tuple[int, ...]:
    """``ops + 1`` seeded digits from 1..9."""
    return tuple(rng.choice(DIGITS) for _ in range(ops + 1))


def distinct_chains(count: int, ops: int, exclude: list[tuple[int, ...]], rng: random.Random) -> list[tuple[int, ...]]:
    """``count`` distinct chains with ``ops`` operations, none of them in ``exclude``."""
    seen = set(exclude)
    chains: list[tuple[int, ...]] = []
    while len(chains) < count:
        chain = random_chain(ops, rng)
        if chain not in seen:
            seen.add(chain)
            chains.append(chain)
    return chains


def per_hops(n: int, max_ops: int) -> list[int]:
    """How many of ``n`` items get k = 1..max_ops operations: as even as possible, smaller k first."""
    return [n // max_ops + (k < n % max_ops) for k in range(max_ops)]


def generate(n: int | None, seed: int, max_ops: int = 4) -> list[TaskItem]:
    """``n`` distinct chains spread evenly over 1..max_ops operations, sharing one few-shot prefix."""
    require_int("max_ops", max_ops, 1, 20)
    n = DEFAULT_N if n is None else n
    require_int("n", n, 1)
    rng = random.Random(seed)
    shots = [random_chain(rng.randint(1, max_ops), rng) for _ in range(N_SHOTS)]
    prefix = "".join(f"{expression(c)} {sum(c)}\n" for c in shots)
    items = []
    for ops, count in enumerate(per_hops(n, max_ops), start=1):
        available = len(DIGITS) ** (ops + 1) - N_SHOTS
        if count > available:
            raise DepthcacheError(f"n={n} needs {count} distinct chains with {ops} operation(s) but only {available} "
                                  f"exist; ask for n <= {available * max_ops} or raise max_ops")
        chains = distinct_chains(count, ops, shots, random.Random(f"{seed}:k{ops}"))
        for i, chain in enumerate(chains):
            item_id = f"chain-k{ops}-{i:03d}"
            items.append(TaskItem(id=item_id, prompt=prefix + expression(chain), answer=f" {sum(chain)}",
                                  choices=numeric_choices(sum(chain), item_rng(seed, item_id)), hops=ops,
                                  meta={"operands": list(chain), "question": expression(chain)}))
    return items
