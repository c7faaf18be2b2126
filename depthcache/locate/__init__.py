"""Where information lives (docs/analyses.md): residual erasure and integrated gradients as layer × position maps."""

from depthcache.locate.maps import MAP_ATTR, is_map, read_map
from depthcache.locate.run import LocateOptions, locate

__all__ = ["MAP_ATTR", "LocateOptions", "is_map", "locate", "read_map"]
