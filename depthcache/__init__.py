"""depthcache: cache a language model's per-layer activations in Zarr and analyse how it uses its depth."""

from depthcache.dtypes import register_bfloat16

register_bfloat16()

__version__ = "0.1.0"
