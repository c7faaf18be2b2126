"""The order in which layers are removed: fixed by depth, by block influence, or greedily by the likelihood."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from depthcache.errors import DepthcacheError

ORDERS = {"last-first": "deepest candidate first", "first-first": "shallowest candidate first",
          "influence": "lowest block influence 1 − cos(h_l, h_l+1) first (ShortGPT)",
          "greedy": "the candidate whose removal costs the least mean gold log-prob next"}


def check_order(order: str) -> None:
    """Refuse unknown orders with the list of known ones."""
    if order not in ORDERS:
        raise DepthcacheError(f"unknown --order {order!r}; choose from " +
                              "; ".join(f"{k} ({v})" for k, v in ORDERS.items()))


def fixed_order(candidates: tuple[int, ...], order: str, influence: np.ndarray) -> list[int]:
    """The removal order of a non-greedy ``order``."""
    if order == "last-first":
        return sorted(candidates, reverse=True)
    if order == "first-first":
        return sorted(candidates)
    return sorted(candidates, key=lambda layer: (influence[layer], layer))


def greedy_next(removed: list[int], remaining: list[int], score: Callable[[list[int]], float]) -> tuple[int, float]:
    """The remaining layer whose removal (on top of ``removed``) keeps ``score`` highest, with that score."""
    scores = {layer: score(removed + [layer]) for layer in remaining}
    best = max(remaining, key=lambda layer: (scores[layer], -layer))
    return best, scores[best]
