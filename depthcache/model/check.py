"""The load check: on a short fixed input, what extraction captures adds up to the model's own computation.

Two identities, computed from the capture hooks in float64: ``resid_pre[l+1] = resid_pre[l] + attn_out[l] +
mlp_out[l]`` for every layer (``resid_final`` after the last), and the model's logits = the store's head (the numpy
logit lens: final norm, unembedding, logit scale and soft-cap) applied to ``resid_final``. Errors are relative to
each token's largest value; a model that fails gets one line naming the architecture, the first failing layer and
the error, before anything is written.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from depthcache.errors import DepthcacheError
from depthcache.model.capture import Capture
from depthcache.model.placement import onloaded, outer_modules
from depthcache.model.structure import Structure, model_head, probe_ids, structure_of
from depthcache.store.head import logits_from_residual

CHECK_TOKENS = 32
# (identity, logits) relative tolerances per compute dtype: a few roundings of the dtype, far below a wrong module.
TOLERANCES = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 2e-2),
              torch.bfloat16: (3e-2, 6e-2)}


@dataclass(frozen=True)
class CheckResult:
    """Largest relative errors of the two identities on the check input, and where the identity error peaks."""

    identity_error: float
    identity_layer: int
    logits_error: float
    tokens: int

    def attrs(self) -> dict[str, float | int]:
        """JSON attributes for the store (``model.load_check``)."""
        return {"identity_error": self.identity_error, "identity_layer": self.identity_layer,
                "logits_error": self.logits_error, "tokens": self.tokens}


def relative_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per token (leading axes): max |got − want| / max |want| over the last axis."""
    scale = np.maximum(np.abs(want).max(-1), np.finfo(np.float64).tiny)
    return np.abs(got - want).max(-1) / scale


def identity_errors(cap: Capture, n_layers: int) -> np.ndarray:
    """(layer,) largest relative error of resid_pre[l] + attn_out[l] + mlp_out[l] against the next residual."""
    def f64(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().cpu().numpy()

    nxt = [cap.records["resid_pre"][layer + 1] for layer in range(n_layers - 1)] + [cap.resid_final]
    return np.array([relative_errors(f64(cap.records["resid_pre"][layer]) + f64(cap.records["attn_out"][layer])
                                     + f64(cap.records["mlp_out"][layer]), f64(nxt[layer])).max()
                     for layer in range(n_layers)])


def describe(structure: Structure) -> str:
    """The architecture as named in messages: class and model type."""
    return f"{structure.class_name} ({structure.model_type})"


def check_model(model: torch.nn.Module, structure: Structure | None = None, tokens: int = CHECK_TOKENS
                ) -> CheckResult:
    """Run the load check; raise the one-line error when either identity fails."""
    structure = structure or structure_of(model)
    dtype = next(model.parameters()).dtype
    ident_tol, logit_tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    layers = range(structure.n_layers)
    with torch.inference_mode(), Capture(model, structure, layers, ("resid", "attn", "mlp")) as cap:
        logits = model(input_ids=probe_ids(model, tokens), use_cache=False).logits
    errors = identity_errors(cap, structure.n_layers)
    failing = np.flatnonzero(~(errors <= ident_tol))
    if failing.size:
        layer = int(failing[0])
        raise DepthcacheError(
            f"{describe(structure)} fails the load check: resid_pre[{layer}] + attn_out + mlp_out differs from what "
            f"layer {layer} outputs by {errors[layer]:.3g} (relative; tolerance {ident_tol:g}); nothing was written")
    lens = logits_from_residual(cap.resid_final.float().cpu().numpy(), model_head(model, structure))
    logits_error = float(relative_errors(lens.astype(np.float64), logits.double().cpu().numpy()).max())
    if not logits_error <= logit_tol:
        raise DepthcacheError(
            f"{describe(structure)} fails the load check: the logit lens of resid_final differs from the model's "
            f"logits by {logits_error:.3g} (relative; tolerance {logit_tol:g}); nothing was written")
    worst = int(errors.argmax())
    return CheckResult(float(errors[worst]), worst, logits_error, tokens)


_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, CheckResult] = weakref.WeakKeyDictionary()


def checked(model: torch.nn.Module, check: bool = True) -> tuple[Structure, CheckResult | None]:
    """The model's structure and its load-check result (the check runs once per model object; ``check=False``
    skips it for users who know why, and returns None); the weights of a dispatched model's embeddings, final norm
    and unembedding are read in for it if offloaded."""
    with onloaded(outer_modules(model)):  # a dispatched model's offloaded head is read directly
        structure = structure_of(model)
        if not check:
            return structure, _CHECKED.get(model)
        if model not in _CHECKED:
            _CHECKED[model] = check_model(model, structure)
    return structure, _CHECKED[model]
