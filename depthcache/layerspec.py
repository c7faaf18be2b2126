"""Layer specs as users write them ('all', '5', '0-5,10'), parsed against a model's depth."""

from __future__ import annotations

from depthcache.errors import DepthcacheError


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """'all', '3', '0-5,10' → sorted layer indices, each checked against the model's depth."""
    if spec.strip() in ("", "all"):
        return tuple(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        try:
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError as exc:
            raise DepthcacheError(f"bad layer spec {part!r}: use e.g. 'all', '5', '0-5,10'") from exc
        if not 0 <= first <= last < n_layers:
            raise DepthcacheError(f"layer(s) {part.strip()} out of range: the model has layers 0..{n_layers - 1}")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))
