"""The mean residual per layer that erasure writes into a cell: from an activation store or reference sequences.

Both exclude position 0 (its residual norm is an outlier) and accumulate in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import torch

from depthcache.analyze.reduce import f32, token_weights
from depthcache.errors import DepthcacheError
from depthcache.extraction.data import load_documents
from depthcache.extraction.windows import bos_token_id, make_windows
from depthcache.model import Capture, LoadedModel, n_layers, structure_of
from depthcache.store.reader import Store

REFERENCE_DATA = "pydoc-topics"
REFERENCE_SEQ_LEN = 128


@dataclass(frozen=True)
class Reference:
    """Mean residual entering each layer, (layer, d_model) float64, and a description of where it came from."""

    mean: np.ndarray
    source: str


def check_same_model(store: Store, loaded: LoadedModel) -> None:
    """Refuse a reference store extracted from another model, or storing only some layers' residuals."""
    model = store.attrs["model"]
    ours, theirs = loaded.provenance.get("weights_sha256"), model.get("weights_sha256")
    if ours != theirs or (ours is None and model["spec"] != loaded.provenance["spec"]):
        raise DepthcacheError(f"--reference {store.location} was extracted from model {model['spec']!r}, not from "
                              f"{loaded.provenance['spec']!r}: use a store of the same model, or omit --reference")
    store.require("resid_pre")
    depth = n_layers(loaded.model)
    if [int(x) for x in store.ds.layer.values] != list(range(depth)):
        raise DepthcacheError(f"--reference {store.location} does not store resid_pre of every layer 0..{depth - 1}: "
                              "re-extract it with --layers all, or omit --reference")


def store_mean(location: str, loaded: LoadedModel) -> Reference:
    """Mean of a store's resid_pre over its tokens at positions ≥ 1 (dask, float32 blocks, float64 sums)."""
    store = Store(location)
    check_same_model(store, loaded)
    weights = token_weights(store.ds, include_first=False)
    resid = f32(store.ds.resid_pre.data).astype(np.float64)  # (layer, token, d_model)
    mean = da.einsum("ltd,t->ld", resid, weights) / weights.sum()
    n = int(weights.sum().compute())
    if n == 0:
        raise DepthcacheError(f"--reference {location} has no committed token at position ≥ 1")
    return Reference(np.asarray(mean.compute()), f"store {location}: mean resid_pre over {n} tokens at position >= 1")


def sequence_mean(loaded: LoadedModel, windows: int) -> Reference:
    """Mean residual entering each layer over the first ``windows`` windows of pydoc-topics (positions ≥ 1)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    structure = structure_of(model)
    depth = structure.n_layers
    docs = load_documents(REFERENCE_DATA).texts
    total = torch.zeros((depth, model.config.hidden_size), dtype=torch.float64)
    count = 0
    tokens: list[list[int]] = []
    for text in docs:  # tokenize only the documents needed
        tokens.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        picked = make_windows(tokens, REFERENCE_SEQ_LEN, bos_token_id(tokenizer))[:windows]
        if len(picked) == windows:
            break
    device = next(model.parameters()).device
    for window in picked:
        ids = torch.tensor(window.tokens, device=device).unsqueeze(0)
        with torch.inference_mode(), Capture(model, structure, range(depth), ("resid",)) as cap:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        total += torch.stack([cap.records["resid_pre"][layer][0, 1:] for layer in range(depth)]).double().sum(1).cpu()
        count += len(window.tokens) - 1
    return Reference((total / count).numpy(), f"{len(picked)} windows of {REFERENCE_DATA} ({REFERENCE_SEQ_LEN} "
                                              f"tokens): mean residual over {count} tokens at position >= 1")
