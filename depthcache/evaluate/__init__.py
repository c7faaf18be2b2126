"""Task evaluations of a model with layers removed: likelihood- vs generation-based scoring (docs/interventions.md)."""

from depthcache.evaluate.prune import PruneOptions, evaluate_prune

__all__ = ["PruneOptions", "evaluate_prune"]
