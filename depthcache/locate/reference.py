"""The mean residual per layer that erasure writes into a cell: from an activation store or reference sequences.

Both exclude position 0 by default (its residual norm is an outlier; ``include_first`` keeps it, as the paper's
reference code does), accumulate in float64, and with ``final`` add the final residual's mean as row L.
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
    """Mean residual entering each layer (then the final one with ``final``), (layer [+ 1], d_model) float64, and a
    description of where it came from."""

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


def positions_text(include_first: bool) -> str:
    """Which positions a mean covers, as the reference's description says it."""
    return "at every position (position 0 included)" if include_first else "at position >= 1"


def store_mean(location: str, loaded: LoadedModel, include_first: bool = False, final: bool = False) -> Reference:
    """Mean of a store's resid_pre (and resid_final with ``final``) over its tokens at positions ≥ 1, or at every
    position with ``include_first`` (dask, float32 blocks, float64 sums)."""
    store = Store(location)
    check_same_model(store, loaded)
    if final:
        store.require("resid_final")
    weights = token_weights(store.ds, include_first=include_first)
    resid = f32(store.ds.resid_pre.data).astype(np.float64)  # (layer, token, d_model)
    if final:
        resid = da.concatenate([resid, f32(store.ds.resid_final.data).astype(np.float64)[None]])
    mean = da.einsum("ltd,t->ld", resid, weights) / weights.sum()
    n = int(weights.sum().compute())
    if n == 0:
        raise DepthcacheError(f"--reference {location} has no committed token {positions_text(include_first)}")
    sites = "resid_pre and resid_final" if final else "resid_pre"
    return Reference(np.asarray(mean.compute()),
                     f"store {location}: mean {sites} over {n} tokens {positions_text(include_first)}")


def sequence_mean(loaded: LoadedModel, windows: int, include_first: bool = False, final: bool = False) -> Reference:
    """Mean residual entering each layer (and the final one with ``final``) over the first ``windows`` windows of
    pydoc-topics, at positions ≥ 1 or, with ``include_first``, at every position."""
    model, tokenizer = loaded.model, loaded.tokenizer
    structure = structure_of(model)
    depth = structure.n_layers
    docs = load_documents(REFERENCE_DATA).texts
    total = torch.zeros((depth + int(final), model.config.hidden_size), dtype=torch.float64)
    first = 0 if include_first else 1
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
        rows = [cap.records["resid_pre"][layer][0] for layer in range(depth)] + ([cap.resid_final[0]] if final else [])
        total += torch.stack(rows)[:, first:].double().sum(1).cpu()
        count += len(window.tokens) - first
    return Reference((total / count).numpy(), f"{len(picked)} windows of {REFERENCE_DATA} ({REFERENCE_SEQ_LEN} "
                                              f"tokens): mean residual over {count} tokens "
                                              f"{positions_text(include_first)}")
