"""Blockwise building blocks shared by analyses: float32 blocks, float64 token reductions, token masks."""

from __future__ import annotations

import threading
from collections.abc import Callable

import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze.bootstrap import bootstrap_ci, ratio
from depthcache.dtypes import is_bfloat16

_SCRATCH = threading.local()


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


def scratch(key: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A reusable per-thread buffer: refilling touched memory is several times faster than fresh pages."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get(key)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = pool[key] = np.empty(shape, dtype)
    return buf


def as_float32(x: np.ndarray, key: str) -> np.ndarray:
    """``x`` as float32: itself when it already is (C-contiguous float32; read, never written), else in the
    per-thread buffer ``key`` (bfloat16 by an exact bit shift, ~4× numpy's cast)."""
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    out = scratch(key, x.shape)
    if is_bfloat16(x.dtype):
        np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, x)
    return out


def position_buckets(seq_len: int) -> np.ndarray:
    """Edges of log-spaced position buckets [0], [1], [2, 4), [4, 8), … up to ``seq_len`` (exclusive)."""
    edges = [0, 1]
    while edges[-1] < seq_len:
        edges.append(min(edges[-1] * 2, seq_len))
    return np.array(edges, dtype=np.int64)


def bucket_partials(values: np.ndarray, position: np.ndarray, include_first: bool, edges: np.ndarray) -> np.ndarray:
    """(4, ..., bucket) token count, sum, sum of squares and max of float64 ``values`` (..., token) per bucket."""
    bucket = np.searchsorted(edges, position, side="right") - 1
    keep = position >= (0 if include_first else 1)
    n_buckets = len(edges) - 1
    onehot = np.zeros((len(position), n_buckets))
    onehot[np.flatnonzero(keep), bucket[keep]] = 1.0
    out = np.empty((4, *values.shape[:-1], n_buckets))
    out[0] = onehot.sum(axis=0)
    used = np.where(keep, values, 0.0)  # an excluded token's inf/NaN must not reach the sums (0 × inf = NaN)
    out[1] = used @ onehot
    out[2] = (used * used) @ onehot
    for b in range(n_buckets):
        mask = keep & (bucket == b)
        out[3, ..., b] = values[..., mask].max(axis=-1) if mask.any() else -np.inf
    return out


def combine_partials(partials: da.Array) -> dict[str, da.Array]:
    """Means, stds and maxima over tokens (overall and per bucket) from per-chunk ``bucket_partials`` stacks."""
    count_b = partials[:, 0].sum(axis=0)
    sums_b, sq_b = partials[:, 1].sum(axis=0), partials[:, 2].sum(axis=0)
    max_b = partials[:, 3].max(axis=0)
    count, sums, sq = count_b.sum(axis=-1), sums_b.sum(axis=-1), sq_b.sum(axis=-1)
    mean = sums / count
    return {"count_by_bucket": count_b[(0,) * (count_b.ndim - 1)], "count": count.ravel()[0],
            "mean_by_bucket": da.where(count_b > 0, sums_b / da.maximum(count_b, 1), np.nan),
            "mean": mean, "std": da.sqrt(da.maximum(sq / count - mean**2, 0)),
            "max": da.where(count > 0, max_b.max(axis=-1), np.nan)}


def run_starts(seq: np.ndarray) -> np.ndarray:
    """Indices where a new window (a run of one ``seq_id``) begins in a block of token window ids (0 first)."""
    return np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]]) if len(seq) else np.zeros(0, np.int64)


def window_pieces(seq: np.ndarray, chunks: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray]:
    """Per token chunk the number of window pieces it holds (a window split by a chunk edge is two pieces), and
    the window id of every piece in order: the chunk sizes of per-piece partial sums."""
    sizes, ids, a = [], [], 0
    for n in chunks:
        block = seq[a:a + n]
        starts = run_starts(block)
        sizes.append(len(starts))
        ids.append(block[starts])
        a += n
    return tuple(sizes), np.concatenate(ids) if ids else np.zeros(0, np.int64)


def piece_reduce(values: np.ndarray, seq: np.ndarray, how: str = "sum") -> np.ndarray:
    """(pieces, ...) sums (or maxima) over the last (token) axis of ``values`` per run of one window id in ``seq``."""
    starts = run_starts(seq)
    ufunc = np.add if how == "sum" else np.maximum
    return np.moveaxis(ufunc.reduceat(values, starts, axis=-1), -1, 0)


def merge_pieces(pieces: np.ndarray, piece_ids: np.ndarray, how: str = "sum") -> np.ndarray:
    """(windows, ...) per-piece partials of the same window combined (sum or max), windows in id order."""
    _, index = np.unique(piece_ids, return_inverse=True)
    n = int(index.max()) + 1 if len(index) else 0
    if how == "sum":
        out = np.zeros((n, *pieces.shape[1:]))
        np.add.at(out, index, pieces)
    else:
        out = np.full((n, *pieces.shape[1:]), -np.inf)
        np.maximum.at(out, index, pieces)
    return out


def windows_of(pieces: da.Array, piece_ids: np.ndarray, how: str = "sum") -> da.Array:
    """Lazy ``merge_pieces`` of a (pieces, ...) dask array: (windows, ...) float64 in one block."""
    n = len(np.unique(piece_ids))
    one = pieces.rechunk({i: -1 for i in range(pieces.ndim)}, method="tasks")  # auto would import distributed
    return da.map_blocks(merge_pieces, one, piece_ids=piece_ids, how=how, dtype=np.float64,
                         chunks=((n,), *[(s,) for s in one.shape[1:]]))


def token_pieces(x: da.Array, w: da.Array, seq: np.ndarray, how: str = "sum") -> tuple[da.Array, np.ndarray]:
    """(pieces, ...) weighted sums (or maxima among weighted tokens) of ``x`` (..., token) per window piece, and
    the pieces' window ids: per-window partials of a dask reduction over tokens, in the same pass."""
    x = x.rechunk({x.ndim - 1: w.chunks[0]}, method="tasks")  # auto would import distributed
    sizes, ids = window_pieces(seq, w.chunks[0])
    seq_d = da.from_array(seq, chunks=(w.chunks[0],))

    def block(v: np.ndarray, weight: np.ndarray, s: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64)
        used = np.where(weight > 0, v * weight, 0.0) if how == "sum" else np.where(weight > 0, v, -np.inf)
        return piece_reduce(used, s, how)

    lead = "abcdefgh"[:x.ndim - 1]
    out = da.blockwise(block, "t" + lead, x, lead + "t", w, "t", seq_d, "t", adjust_chunks={"t": sizes},
                       dtype=np.float64, concatenate=True, meta=np.empty((0,) * x.ndim))
    return out, ids


def lazy_interval(sums: da.Array, counts: da.Array, n_resamples: int, seed: int, level: float,
                  statistic: Callable[[np.ndarray, np.ndarray], np.ndarray] = ratio) -> da.Array:
    """(2, ...) lazy ``bootstrap_ci`` (lo, hi) of per-window ``sums`` (windows, ...) and ``counts``: computed in
    the same graph, so in the same pass, as the sums themselves."""
    def bounds(s: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.stack(bootstrap_ci(s, c, statistic, n_resamples, seed, level))

    shape = statistic(np.zeros((1, *sums.shape[1:])), np.ones((1, *counts.shape[1:]))).shape[1:] \
        if statistic is not ratio else sums.shape[1:]
    # a blockwise task over both whole arrays (dask.delayed of a dask array would import distributed's shuffle)
    out = "z" + "qrstuvxy"[:len(shape)]
    sums, counts = sums.rechunk(-1), counts.rechunk(-1)  # small: one block each, no chunk blow-up in the blockwise
    return da.blockwise(bounds, out, sums, "w" + "abcdefgh"[:sums.ndim - 1], counts, "W" + "ijklmnop"[:counts.ndim - 1],
                        new_axes=dict(zip(out, (2, *shape))), concatenate=True, dtype=np.float64,
                        meta=np.empty((0,) * len(out)))
