"""Blockwise building blocks shared by analyses: float32 blocks, float64 token reductions, token masks."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr


def f32(x: da.Array) -> da.Array:
    """Cast blocks to float32 (never reduce in bf16/f16)."""
    return x.astype(np.float32)


def norm(x: da.Array) -> da.Array:
    """L2 norm over the last (d_model) axis, computed in float32 per block."""
    x = f32(x)
    return da.sqrt((x * x).sum(axis=-1))


def cosine(x: da.Array, y: da.Array, eps: float = 1e-12) -> da.Array:
    """Cosine similarity over d_model of two equally shaped arrays, float32 per block."""
    x, y = f32(x), f32(y)
    return (x * y).sum(axis=-1) / da.maximum(da.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1)), eps)


def token_weights(ds: xr.Dataset, include_first: bool) -> da.Array:
    """float64 weight per token: 0 for position 0 when ``include_first`` is False, else 1."""
    pos = ds.position.data
    return (pos >= (0 if include_first else 1)).astype(np.float64)


def weighted_mean(x: da.Array, w: da.Array) -> da.Array:
    """Mean over the last (token) axis with weights, accumulated in float64."""
    return (x.astype(np.float64) * w).sum(axis=-1) / w.sum()


def weighted_std(x: da.Array, w: da.Array) -> da.Array:
    """Standard deviation over the last (token) axis with weights, float64 (E[x²] − E[x]²)."""
    mean = weighted_mean(x, w)
    sq = (x.astype(np.float64) ** 2 * w).sum(axis=-1) / w.sum()
    return da.sqrt(da.maximum(sq - mean**2, 0))


def masked_max(x: da.Array, w: da.Array) -> da.Array:
    """Max over the last (token) axis among tokens with non-zero weight."""
    return da.where(w > 0, x.astype(np.float64), -np.inf).max(axis=-1)
