"""What makes two stores (or a store and a new run) the same: one definition, compared aspect by aspect.

Resume needs every aspect; skip runs need the baseline's model, tokenizer and data; cached results are keyed by the
aspects an analysis reads. Each aspect is a few attribute fields, so a refusal can name what differs.
"""

from __future__ import annotations

from typing import Any

# the extraction options that shape the stored numbers (progress bars, paths and worker shards do not)
CAPTURE_OPTIONS = ("sites", "layers", "max_tokens", "seq_len", "batch_size", "dtype", "top_k")
ASPECTS = ("model", "tokenizer", "data", "capture")


def aspect_fields(attrs: dict[str, Any], aspect: str) -> dict[str, Any]:
    """The attribute fields of one aspect of a store's identity, named as in the attributes."""
    model = attrs["model"]
    if aspect == "model":  # the weights' hash when known; a hub id or folder is named by its spec
        sha = model.get("weights_sha256")
        return {"model.weights_sha256": sha} if sha else {"model.spec": model.get("spec")}
    if aspect == "tokenizer":
        return {"model.tokenizer_sha256": model.get("tokenizer_sha256")}
    if aspect == "data":
        return {"dataset.sha256": attrs["dataset"]["sha256"]}
    if aspect == "capture":
        options = attrs["options"]
        return {**{f"options.{k}": options.get(k) for k in CAPTURE_OPTIONS},
                "options.device_type": str(options.get("device", "cpu")).split(":")[0],
                "layout.num_workers": attrs["layout"].get("num_workers", 1)}
    raise ValueError(f"unknown identity aspect {aspect!r}")


def identity(attrs: dict[str, Any], aspects: tuple[str, ...] = ASPECTS) -> dict[str, Any]:
    """The fields of the given aspects (all by default) of a store's identity."""
    return {k: v for aspect in aspects for k, v in aspect_fields(attrs, aspect).items()}


def differences(ours: dict[str, Any], theirs: dict[str, Any], aspects: tuple[str, ...] = ASPECTS) -> list[str]:
    """One line per identity field where two stores' attributes differ ('store has …, this run has …')."""
    a, b = identity(ours, aspects), identity(theirs, aspects)
    return [f"  {k}: store has {a.get(k)!r}, this run has {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]
