"""Everything about a live model: loading, its architecture adapter, capture hooks, skips, restarts, pruned copies.

extraction/, locate/ and evaluate/ touch a model only through the names exported here; analyses never import this
package (they read stores).
"""

from depthcache.model.architectures import (
                                            Architecture,
                                            architecture_for,
                                            decoder_layers,
                                            final_norm_params,
                                            n_layers,
                                            parallel_residual,
                                            submodule,
                                            unembedding,
)
from depthcache.model.capture import Capture, first_tensor
from depthcache.model.loading import (
                                            ALIASES,
                                            DEFAULT_MODEL,
                                            LoadedModel,
                                            cache_dir,
                                            file_sha256,
                                            load_model,
                                            resolve_device,
                                            wrap_model,
)
from depthcache.model.pruned import prune_copy, prune_model, removed_layers
from depthcache.model.restart import Clean, answer_probs, clean_run, frozen, run_from
from depthcache.model.skips import Skip, only_layers

__all__ = ["ALIASES", "Architecture", "Capture", "Clean", "DEFAULT_MODEL", "LoadedModel", "Skip", "answer_probs",
           "architecture_for", "cache_dir", "clean_run", "decoder_layers", "file_sha256", "final_norm_params",
           "first_tensor", "frozen", "load_model", "n_layers", "only_layers", "parallel_residual", "prune_copy",
           "prune_model", "removed_layers", "resolve_device", "run_from", "submodule", "unembedding", "wrap_model"]
