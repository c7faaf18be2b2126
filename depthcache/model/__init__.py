"""Everything about a live model: loading, its discovered structure and load check, capture hooks, skips, restarts,
pruned copies.

extraction/, locate/ and evaluate/ touch a model only through the names exported here; analyses never import this
package (they read stores).
"""

from depthcache.model.capture import Capture, CaptureInto, token_runs
from depthcache.model.check import TOLERANCES, CheckResult, check_model, checked, relative_errors
from depthcache.model.loading import (
                                            ALIASES,
                                            DEFAULT_MODEL,
                                            LoadedModel,
                                            cache_dir,
                                            file_sha256,
                                            load_model,
                                            resolve_device,
                                            tokenizer_files,
                                            weights_folder,
                                            wrap_model,
)
from depthcache.model.placement import (
                                            MODEL_DTYPES,
                                            Placement,
                                            main_device,
                                            onloaded,
                                            outer_modules,
                                            placed_attrs,
                                            weight_bytes,
)
from depthcache.model.pruned import prune_copy, prune_model, removed_layers
from depthcache.model.restart import (
                                            Clean,
                                            answer_probs,
                                            clean_run,
                                            frozen,
                                            logits_from,
                                            output_probs,
                                            run_from,
                                            whole_sequence,
)
from depthcache.model.skips import Replace, Skip, only_layers
from depthcache.model.structure import (
                                            Structure,
                                            decoder_layers,
                                            discover,
                                            first_tensor,
                                            model_head,
                                            n_layers,
                                            structure_of,
                                            submodule,
)

__all__ = ["ALIASES", "Capture", "CaptureInto", "CheckResult", "Clean", "DEFAULT_MODEL", "LoadedModel",
           "MODEL_DTYPES", "Placement", "Replace", "Skip", "Structure", "TOLERANCES", "answer_probs", "cache_dir",
           "check_model", "checked", "clean_run", "decoder_layers", "discover", "file_sha256", "first_tensor",
           "frozen", "load_model", "logits_from", "main_device", "model_head", "n_layers", "onloaded", "only_layers",
           "outer_modules", "output_probs", "placed_attrs", "prune_copy", "prune_model", "relative_errors",
           "removed_layers", "resolve_device", "run_from", "structure_of", "submodule", "token_runs",
           "tokenizer_files", "weight_bytes", "weights_folder", "whole_sequence", "wrap_model"]
