"""Percentile bootstrap over units (windows or items), from per-unit partial sums (docs/analyses.md#intervals).

Tokens of one window are not independent, so the unit resampled is a whole window (a task item in a task store).
An analysis reduces its tokens to per-window sums and counts in the pass it makes anyway; a resample then costs one
(resamples × units) @ (units × values) product instead of a pass over tokens. Draws depend only on the number of
units, the resample count and the seed, so every statistic of one store drawn with the same seed uses the same
resampled windows. numpy only: no torch, no dask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from depthcache.errors import DepthcacheError

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
BATCH_ENTRIES = 2**22  # resamples × units per batch of the resampling product (the draws themselves are one
# (resamples × units) int64 array: 8 MB for 1,000 resamples of 1,000 windows)

Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_options(n_resamples: int, level: float) -> None:
    """Refuse a resample count or level the percentile interval cannot use."""
    if int(n_resamples) < 2:
        raise DepthcacheError(f"ci_resamples must be at least 2 (got {n_resamples}); the default is {N_RESAMPLES}")
    if not 0.0 < float(level) < 1.0:
        raise DepthcacheError(f"ci_level must lie strictly between 0 and 1 (got {level}), e.g. 0.95")


def multiplicities(n_units: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, n_units) int64: how often each unit is drawn in each resample of n_units draws with
    replacement (numpy's default_rng(seed); the same arguments give the same draws)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_units, size=(n_resamples, n_units)) if n_units else np.zeros((n_resamples, 0), int)
    counts = np.zeros((n_resamples, n_units), dtype=np.int64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], picks), 1)
    return counts


def ratio(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The default statistic: the mean over tokens of the resampled units, sums / counts (NaN where no token)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return sums / counts


def counts_like(per_unit_sums: np.ndarray, per_unit_counts: np.ndarray) -> np.ndarray:
    """Per-unit counts as (units, 1, ..., 1) when given per unit only, so they broadcast against the sums."""
    counts = np.asarray(per_unit_counts, dtype=np.float64)
    return counts.reshape(counts.shape + (1,) * (per_unit_sums.ndim - counts.ndim))


def replicates(per_unit_sums: np.ndarray, per_unit_counts: np.ndarray, statistic: Statistic = ratio,
               n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, ...) the statistic of each resample: ``statistic(sums, counts)`` of the resampled units' summed
    partial sums and counts (each with a leading resample axis)."""
    sums = np.asarray(per_unit_sums, dtype=np.float64)
    counts = counts_like(sums, per_unit_counts)
    n_units = sums.shape[0]
    draws = multiplicities(n_units, n_resamples, seed).astype(np.float64)
    flat_sums, flat_counts = sums.reshape(n_units, -1), counts.reshape(n_units, -1)
    step = max(1, BATCH_ENTRIES // max(n_units, 1))
    out = []
    for a in range(0, n_resamples, step):
        w = draws[a:a + step]
        out.append(statistic((w @ flat_sums).reshape(len(w), *sums.shape[1:]),
                             (w @ flat_counts).reshape(len(w), *counts.shape[1:])))
    return np.concatenate(out)


def max_replicates(per_unit_max: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, ...) the maximum over each resample's drawn units of per-unit maxima (same draws as
    ``replicates`` with the same arguments)."""
    maxima = np.asarray(per_unit_max, dtype=np.float64)
    drawn = multiplicities(maxima.shape[0], n_resamples, seed) > 0
    flat = maxima.reshape(maxima.shape[0], -1)
    out = np.stack([flat[row].max(axis=0) if row.any() else np.full(flat.shape[1], np.nan) for row in drawn])
    return out.reshape(n_resamples, *maxima.shape[1:])


def percentile_interval(samples: np.ndarray, level: float = LEVEL,
                        method: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the (1 − level) / 2 and (1 + level) / 2 quantiles over the leading (resample) axis, NaN
    replicates ignored; ``method`` as numpy's quantile ('inverted_cdf' for discrete values such as layers)."""
    import warnings

    tail = (1.0 - level) / 2.0
    with warnings.catch_warnings():  # an all-NaN column is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(np.asarray(samples, dtype=np.float64), [tail, 1.0 - tail], axis=0, method=method)
    return lo, hi


def bootstrap_ci(per_unit_sums: np.ndarray, per_unit_counts: np.ndarray, statistic: Statistic = ratio,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) percentile-bootstrap interval of ``statistic`` over units (windows, documents or items, never
    tokens).

    ``per_unit_sums``: (units, ...) float partial sums of each unit; ``per_unit_counts``: (units,) or (units, ...)
    its token (or item) counts. Each of ``n_resamples`` resamples draws units with replacement
    (``multiplicities``, seeded), adds their sums and counts, and applies ``statistic(sums, counts)`` (default: the
    mean, sums / counts); the interval is the (1 − level) / 2 and (1 + level) / 2 quantiles of those values, NaNs
    (e.g. a resample without tokens) ignored. This name and signature are the package's stable interval API."""
    check_options(n_resamples, level)
    return percentile_interval(replicates(per_unit_sums, per_unit_counts, statistic, n_resamples, seed), level)
