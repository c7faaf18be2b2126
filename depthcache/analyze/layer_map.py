"""layer-map: affine maps from a shallow model's residual stream to a deeper model's, for every layer pair (docs/analyses.md).

Two inputs: two stores of the same tokens (same tokenizer, data and windows), or one statistics folder made by
``depthcache map-stats`` from two live models (depthcache.store.map_stats). Sources are the shallow model's residual
boundaries i (the inputs of its stored layers, then the residual after its last layer), targets the deep model's
boundaries j (``site="attn"``/``"mlp"``: the sublayer outputs instead). Tokens are split by whole window: from
stores, windows are ranked by a fixed integer hash of their id; the first ``test_fraction`` of them form the test
split, the next ``val_fraction`` the validation split, the rest the training split (position 0 is left out unless
``include_first``); a statistics folder records its own split.

Exact out-of-core scheme:
1. Training statistics (depthcache.store.map_stats): per source Σx and XᵀX, per target Σy and Σ‖y‖², per pair XᵀY,
   float64 sums of products formed per product group of whole training windows, all rows shifted by the first
   window's mean. They add up over disjoint tokens; the store path builds the same statistics a live run does.
2. Per source layer: one eigendecomposition C = V diag(λ) Vᵀ of the centered training Gram; the ridge solution
   for penalty α (centered, i.e. an intercept as in scikit-learn's ``fit_intercept=True``) is
   W(α) = V diag(1/(λ+α)) Vᵀ Cxy for every target at once. The validation error of every candidate penalty
   follows in d×d space from the validation sums: SSE(α) = Syy − 2 tr(Wᵀ Gxy) + tr(Wᵀ Gxx W) in the eigenbasis
   (one d×d×e product per pair, then O(d²) per candidate). Candidate penalties are ``grid`` × the mean eigenvalue
   tr(C)/d of that source layer; the penalty is chosen per source layer (``select="source"``: best mean validation
   R² over the targets) or per pair (``select="pair"``).
3. Test metrics for the chosen maps from the test rows (a bounded slice in a statistics folder): R² = 1 − SSE/SST
   over all dimensions (SST about the test mean; scikit-learn's ``r2_score(..., multioutput="variance_weighted")``)
   and the paper's metric, the mean over tokens of ‖ŷ − y‖/‖y‖, which no Gram sum can give. Intervals: a
   delete-one-group jackknife over ``jackknife_groups`` groups of whole test windows (Student t, 95 %).
4. Learning curve: the same fit from the training sums at each curve point (doubling token counts), tested on the
   same test rows.

Memory: source layers are processed in groups of g so that the float64 sums of one group (2 splits × g × (T + 1)
d×d-sized blocks for T targets), one float32 block product (g × T blocks) and the group's maps (g × T blocks) fit in
``memory_gib``; from stores each group is one pass over the data (all groups: the same FLOPs as one pass).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from depthcache.analyze import plotting
from depthcache.analyze.layer_subset import layer_positions
from depthcache.analyze.registry import Count, Positive, analysis
from depthcache.errors import DepthcacheError
from depthcache.progress import advance, stage
from depthcache.store.head import tokenizer_files
from depthcache.store.identity import differences
from depthcache.store.io import can_write, open_result, write_dataset_atomically
from depthcache.store.map_stats import (
    EXCLUDED,
    HASH_MULTIPLIER,
    TEST,
    TRAIN,
    VAL,
    MapStats,
    Moments,
    create_stats,
    curve_folders,
    curve_point,
    is_stats,
    load_stats,
    product_groups,
    read_stats_attrs,
    save_checkpoint,
    save_curve_point,
    shift_of,
    split_by_rows,
    tokenization_files,
    window_rows,
)
from depthcache.store.reader import Store
from depthcache.store.results import canonical, entry_key

SITES = {"resid": ("resid_pre", "resid_final"), "attn": ("attn_out",), "mlp": ("mlp_out",)}
DEFAULT_GRID = tuple(float(g) for g in np.logspace(-7, 1, 9))
TARGET_BLOCK_TOKENS = 4096
BLOCK_BYTES = 256 * 2**20  # float32 bytes of one block of rows (all source and target layers)
PRODUCT_ROWS = 4096  # training rows per product group (whole windows): GEMM-efficient, bounded memory
JACKKNIFE_GROUPS = 20
TINY = 1e-12


# ----------------------------------------------------------------------------------------------- inputs and checks

def boundaries(store: Store, site: str, layers: str = "all") -> tuple[da.Array, np.ndarray]:
    """(layer, token, d) lazy activations of ``site`` at the stored boundaries of the layer spec ``layers`` (for
    resid, L is the final residual), and the layer index of each; the other layers are never read."""
    store.require(*SITES[site])
    ds = store.ds
    stored = ds.layer.values.astype(np.int64)
    data = ds[SITES[site][0]].data
    if site == "resid":
        stored = np.append(stored, store.n_layers)
        data = da.concatenate([data, ds.resid_final.data[None]], axis=0)
    if layers.strip() in ("", "all"):
        return data, stored
    positions = layer_positions(stored, layers, store.n_layers + (site == "resid"))
    pre = [p for p in positions if p < ds.sizes["layer"]]
    parts = [store.layers(SITES[site][0], pre)] if pre else []
    if len(pre) < len(positions):  # the final residual
        parts.append(ds.resid_final.data[None])
    return da.concatenate(parts, axis=0), stored[positions]


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """Index of the first differing element of two equally long arrays, or None when equal."""
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else None


def stored_tokenization(store: Store) -> dict[str, bytes]:
    """The store's tokenizer files that decide how text becomes ids (chat template left out); the files' sha256 is
    checked against the recorded one."""
    return tokenization_files(tokenizer_files(store.group, store.attrs))


def same_tokenizer(shallow: Store, deep: Store) -> bool:
    """Whether two stores tokenize alike: the same recorded tokenizer hash, or the same stored tokenizer files apart
    from the chat template."""
    if not differences(shallow.attrs, deep.attrs, ("tokenizer",)):
        return True
    try:
        return stored_tokenization(shallow) == stored_tokenization(deep)
    except DepthcacheError:
        return False


def check_same_tokens(shallow: Store, deep: Store) -> None:
    """Refuse two stores that do not hold the same tokens in the same windows (and tokenizer)."""
    if not same_tokenizer(shallow, deep):
        hashes = [s.attrs["model"].get("tokenizer_sha256") for s in (shallow, deep)]
        raise DepthcacheError(f"the stores' tokenizers differ (sha256 {hashes[0]} in {shallow.location}, {hashes[1]} "
                              f"in {deep.location}): layer maps need two models with the same tokenizer")
    a, b = shallow.ds, deep.ds
    if a.sizes["token"] != b.sizes["token"]:
        raise DepthcacheError(f"{shallow.location} holds {a.sizes['token']:,} tokens but {deep.location} holds "
                              f"{b.sizes['token']:,}: extract both with the same --data, --max-tokens and --seq-len")
    for name in ("token_id", "position"):
        k = first_difference(a[name].values, b[name].values)
        if k is not None:
            raise DepthcacheError(
                f"the stores' {name} differ first at token {k} (window {int(a.seq_id.values[k])}: "
                f"{int(a[name].values[k])} in {shallow.location}, {int(b[name].values[k])} in {deep.location}): "
                "extract both with the same --data, --max-tokens and --seq-len")


def split_tokens(seq_id: np.ndarray, position: np.ndarray, val_fraction: float, test_fraction: float,
                 include_first: bool) -> np.ndarray:
    """Per token: TRAIN, VAL, TEST (whole windows, ranked by a fixed hash of the window id) or EXCLUDED."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DepthcacheError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    windows = np.unique(seq_id)
    n_test = max(1, round(test_fraction * len(windows)))
    n_val = max(1, round(val_fraction * len(windows)))
    if len(windows) < n_test + n_val + 1:
        raise DepthcacheError(f"only {len(windows)} windows: a train/validation/test split needs at least 3; "
                              "extract more tokens (--max-tokens) or shorter windows (--seq-len)")
    order = windows[np.argsort((windows.astype(np.uint64) * HASH_MULTIPLIER) % 2**32, kind="stable")]
    split_of = dict.fromkeys(order[:n_test].tolist(), TEST) | dict.fromkeys(order[n_test:n_test + n_val].tolist(),
                                                                             VAL)
    splits = np.array([split_of.get(s, TRAIN) for s in seq_id.tolist()], dtype=np.int8)
    return np.where(position >= (0 if include_first else 1), splits, EXCLUDED).astype(np.int8)


# ------------------------------------------------------------------------------------------------- accumulation

def read_blocks(x: da.Array, y: da.Array, block_tokens: int,
                dtype: np.dtype) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Yield (token slice, x rows (K, g, d), y rows (K, t, e)) cast to ``dtype``, one dask compute per block."""
    n = x.shape[1]
    for start in range(0, n, block_tokens):
        window = slice(start, min(start + block_tokens, n))
        xb, yb = dask.compute(x[:, window].astype(dtype), y[:, window].astype(dtype))
        advance()
        yield window, np.ascontiguousarray(xb.transpose(1, 0, 2)), np.ascontiguousarray(yb.transpose(1, 0, 2))


def rows_of(x: da.Array, y: da.Array, index: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token rows ``index`` of x (g, n, d) and y (t, n, e) as (K, g, d) and (K, t, e) in ``dtype``."""
    xb, yb = dask.compute(x[:, index].astype(dtype), y[:, index].astype(dtype))
    return np.ascontiguousarray(xb.transpose(1, 0, 2)), np.ascontiguousarray(yb.transpose(1, 0, 2))


def window_starts(seq_id: np.ndarray) -> np.ndarray:
    """First token index of each window of a store (windows are contiguous), then the token count."""
    return np.concatenate([[0], np.flatnonzero(np.diff(seq_id)) + 1, [len(seq_id)]])


def used_tokens(starts: np.ndarray, windows: np.ndarray, first: int) -> np.ndarray:
    """Token indices of ``windows`` (window ordinals) from position ``first`` on, in order."""
    return np.concatenate([np.arange(starts[w] + first, starts[w + 1]) for w in windows] or [np.zeros(0, int)])


def store_statistics(x: da.Array, y: da.Array, split: np.ndarray, seq_id: np.ndarray, include_first: bool,
                     dtype: np.dtype, product_rows: int, curve_start: int = 0) -> tuple[MapStats, list[Moments]]:
    """The map statistics of stored activations, as a live run (``depthcache map-stats``) forms them: the shift from
    the first window, training sums over product groups of whole training windows, the held-out rows lazily;
    also the training sums at each learning-curve point."""
    g, _, d = x.shape
    t, _, e = y.shape
    starts = window_starts(seq_id)
    first = 0 if include_first else 1
    lengths = np.diff(starts)
    window_split = np.full(len(lengths), EXCLUDED, dtype=np.int8)
    window_split[lengths > first] = split[starts[:-1][lengths > first] + first]
    shift = shift_of(*rows_of(x, y, used_tokens(starts, np.flatnonzero(lengths > first)[:1], first),
                              np.dtype(np.float32)))
    train = Moments.zeros(g, d, t, e)
    points, flops = [], 0.0
    training = np.flatnonzero(window_split == TRAIN)
    rows = np.diff(starts)[training] - first
    for a, b, point in product_groups(rows, product_rows, curve_start):
        xb, yb = rows_of(x, y, used_tokens(starts, training[a:b], first), dtype)
        flops += train.add(xb - shift.x.astype(dtype), yb - shift.y.astype(dtype))
        advance()
        if point:
            points.append(Moments(train.n, train.sx.copy(), train.gxx.copy(), train.sy.copy(), train.syy.copy(),
                                  train.gxy.copy()))
    held = np.flatnonzero((split == VAL) | (split == TEST))
    stats = MapStats({"product_rows": product_rows, "curve_start": curve_start, "accumulate_gflop": flops / 1e9},
                     shift, train, x[:, held], y[:, held], seq_id[held].astype(np.int64), split[held],
                     {"complete": True, "ranges": [[0, len(starts) - 1]]})
    return stats, points


# ------------------------------------------------------------------------------------------------------ solving

def centered(m: Moments, i: int, t: int, mx: np.ndarray,
             my: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums of source i about the means mx (d,), my (t, e): Σ(x−mx)(x−mx)ᵀ, Σ(x−mx)⊗(y−my), Σ‖y−my‖² per target."""
    sx = m.sx[i]
    gxx = m.gxx[i] - np.outer(sx, mx) - np.outer(mx, sx) + m.n * np.outer(mx, mx)
    gxy = (m.pair(i, t) - sx[:, None, None] * my[None] - mx[:, None, None] * m.sy[None]
           + m.n * mx[:, None, None] * my[None])
    syy = m.syy - 2 * np.einsum("te,te->t", my, m.sy) + m.n * np.einsum("te,te->t", my, my)
    return gxx, gxy, syy


@dataclass
class SourceFit:
    """Everything solved for one source layer: eigenbasis, candidate penalties, validation R² and chosen maps."""

    mean_x: np.ndarray       # (d,)  training mean (shifted coordinates)
    mean_y: np.ndarray       # (t, e)
    eigvals: np.ndarray      # (d,)
    eigvecs: np.ndarray      # (d, d)
    rotated: np.ndarray      # (d, t, e)  Vᵀ Cxy
    penalties: np.ndarray    # (a,) candidate penalties
    val_r2: np.ndarray       # (t, a)
    chosen: np.ndarray       # (t,) index of the chosen penalty per target

    def weights(self, penalty_index: np.ndarray) -> np.ndarray:
        """Maps (t, d, e) for one candidate index per target: W_j = V diag(1/(λ+α_j)) Vᵀ Cxy_j."""
        inv = 1.0 / (self.eigvals[:, None] + self.penalties[penalty_index][None])  # (d, t)
        return np.einsum("dk,kte->tde", self.eigvecs, self.rotated * inv[:, :, None], optimize=True)


def solve_source(train: Moments, val: Moments, i: int, grid: np.ndarray, select: str) -> SourceFit:
    """Eigendecompose source i's centered training Gram; validation R² of every candidate penalty and target."""
    t = train.sy.shape[0]
    mx, my = train.sx[i] / train.n, train.sy / train.n
    gram, cross, _ = centered(train, i, t, mx, my)
    lam, vecs = np.linalg.eigh(gram)
    lam = np.maximum(lam, 0.0)
    penalties = grid * max(lam.mean(), TINY)
    rotated = np.einsum("dk,dte->kte", vecs, cross, optimize=True)
    vgram, vcross, vsyy = centered(val, i, t, mx, my)
    h = vecs.T @ vgram @ vecs
    b = np.einsum("dk,dte->kte", vecs, vcross, optimize=True)
    inv = 1.0 / (lam[None] + penalties[:, None])  # (a, d)
    linear = np.einsum("kt,ak->ta", np.einsum("kte,kte->kt", rotated, b), inv)
    quadratic = np.empty_like(linear)
    for j in range(t):
        hm = h * (rotated[:, j] @ rotated[:, j].T)
        quadratic[j] = np.einsum("ak,kl,al->a", inv, hm, inv, optimize=True)
    sse = vsyy[:, None] - 2 * linear + quadratic
    sst = val.syy - np.einsum("te,te->t", val.sy, val.sy) / val.n
    val_r2 = 1 - sse / np.maximum(sst, TINY)[:, None]
    chosen = (np.full(t, np.argmax(val_r2.mean(axis=0))) if select == "source" else np.argmax(val_r2, axis=1))
    return SourceFit(mx, my, lam, vecs, rotated, penalties, val_r2, chosen)


# ------------------------------------------------------------------------------------------------------ testing

@dataclass
class TestSums:
    """Sums over test rows for the chosen maps (float64), per jackknife group of test windows: count, SSE and
    Σ‖ŷ−y‖/‖y‖ per pair, target sums."""

    n: np.ndarray        # (G,)
    sse: np.ndarray      # (G, g, t)
    rel: np.ndarray      # (G, g, t)
    sy: np.ndarray       # (G, t, e)
    syy: np.ndarray      # (G, t)

    @classmethod
    def zeros(cls, groups: int, g: int, t: int, e: int) -> TestSums:
        """Empty sums for ``groups`` jackknife groups."""
        return cls(np.zeros(groups), np.zeros((groups, g, t)), np.zeros((groups, g, t)), np.zeros((groups, t, e)),
                   np.zeros((groups, t)))

    def add(self, k: int, x: np.ndarray, y: np.ndarray, y_norm: np.ndarray, maps: list[np.ndarray],
            means: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Predict the rows y (K, t, e) of group k from x (K, g, d) with each source's maps (d, t·e) and add the
        errors."""
        rows, t, e = y.shape
        self.n[k] += rows
        self.sy[k] += y.sum(axis=0, dtype=np.float64)
        self.syy[k] += np.square(y).sum(axis=(0, 2), dtype=np.float64)
        for i, (w, (mx, my)) in enumerate(zip(maps, means)):
            err = ((x[:, i] - mx.astype(x.dtype)) @ w).reshape(rows, t, e) + (my.astype(x.dtype) - y)
            sq = np.square(err).sum(axis=2, dtype=np.float64)
            self.sse[k, i] += sq.sum(axis=0)
            self.rel[k, i] += (np.sqrt(sq) / np.maximum(y_norm, TINY)).sum(axis=0)

    def metrics(self, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(R², mean ‖ŷ−y‖/‖y‖) per pair over the groups ``keep`` (all by default)."""
        keep = np.ones(len(self.n), bool) if keep is None else keep
        n, sy, syy = self.n[keep].sum(), self.sy[keep].sum(axis=0), self.syy[keep].sum(axis=0)
        sst = syy - np.einsum("te,te->t", sy, sy) / n
        return 1 - self.sse[keep].sum(axis=0) / np.maximum(sst, TINY), self.rel[keep].sum(axis=0) / n


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom: its density integrated
    numerically (Simpson), inverted by bisection; no scipy needed."""
    from math import gamma, pi, sqrt

    scale = gamma((df + 1) / 2) / (sqrt(df * pi) * gamma(df / 2))

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 2001)
        pdf = scale * (1 + grid**2 / df) ** (-(df + 1) / 2)
        return 0.5 + (grid[1] - grid[0]) / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def jackknife(sums: TestSums, level: float = 0.95) -> dict[str, np.ndarray]:
    """Delete-one-group jackknife intervals of R² and rel_error per pair: estimate ± t(G−1)·SE, where
    SE² = (G−1)/G · Σ_k (θ₋ₖ − mean θ₋ₖ)² (NaN with fewer than two non-empty groups)."""
    groups = np.flatnonzero(sums.n > 0)
    r2, rel = sums.metrics()
    if len(groups) < 2:
        nan = np.full_like(r2, np.nan)
        return {"r2_lo": nan, "r2_hi": nan, "rel_error_lo": nan, "rel_error_hi": nan}
    left_out = [sums.metrics(np.isin(np.arange(len(sums.n)), np.delete(groups, k))) for k in range(len(groups))]
    out = {}
    q = student_t_quantile(0.5 + level / 2, len(groups) - 1)
    for name, estimate, values in (("r2", r2, np.stack([v[0] for v in left_out])),
                                   ("rel_error", rel, np.stack([v[1] for v in left_out]))):
        se = np.sqrt((len(groups) - 1) / len(groups) * np.square(values - values.mean(axis=0)).sum(axis=0))
        out[f"{name}_lo"], out[f"{name}_hi"] = estimate - q * se, estimate + q * se
    return out


def test_groups(window: np.ndarray, groups: int) -> np.ndarray:
    """Jackknife group of each test row: the test windows in id order cut into ``groups`` nearly equal runs."""
    windows, inverse = np.unique(window, return_inverse=True)
    per_window = (np.arange(len(windows)) * min(groups, len(windows))) // max(len(windows), 1)
    return per_window[inverse]


def evaluate(stats: MapStats, block_tokens: int, dtype: np.dtype, fits: list[SourceFit],
             groups: int) -> TestSums:
    """One pass over the held-out test rows: SSE, Σ‖ŷ−y‖/‖y‖ and target sums per jackknife group, for each
    source's chosen maps."""
    g, t, e = stats.heldout_x.shape[0], stats.heldout_y.shape[0], stats.heldout_y.shape[2]
    maps = [f.weights(f.chosen).transpose(1, 0, 2).reshape(-1, t * e).astype(dtype) for f in fits]
    means = [(f.mean_x, f.mean_y) for f in fits]
    test = np.flatnonzero(stats.heldout_split == TEST)
    group_of = test_groups(stats.heldout_window[test], groups)
    sums = TestSums.zeros(int(group_of.max()) + 1 if len(test) else 1, g, t, e)
    x, y = lazy(stats.heldout_x)[:, test], lazy(stats.heldout_y)[:, test]
    sx, sy = stats.shift.x.astype(dtype), stats.shift.y.astype(dtype)
    for window, xb, yb in read_blocks(x, y, block_tokens, dtype):
        y_norm = np.sqrt(np.square(yb).sum(axis=2, dtype=np.float64))
        xb, yb = xb - sx, yb - sy
        for k in np.unique(group_of[window]):
            rows = group_of[window] == k
            sums.add(int(k), xb[rows], yb[rows], y_norm[rows], maps, means)
    return sums


def lazy(rows: Any) -> da.Array:
    """Held-out rows as a dask array (numpy rows from a live run, zarr-backed or store-backed ones as they are)."""
    return rows if isinstance(rows, da.Array) else da.from_array(np.asarray(rows), chunks=(1, 4096, -1))


def validation_sums(stats: MapStats, block_tokens: int, dtype: np.dtype) -> Moments:
    """Sums over the held-out validation rows (shifted as the training rows were)."""
    g, d, t, e = stats.shape
    val = np.flatnonzero(stats.heldout_split == VAL)
    moments = Moments.zeros(g, d, t, e)
    sx, sy = stats.shift.x.astype(dtype), stats.shift.y.astype(dtype)
    for _, xb, yb in read_blocks(lazy(stats.heldout_x)[:, val], lazy(stats.heldout_y)[:, val], block_tokens, dtype):
        moments.add(xb - sx, yb - sy)
    return moments


# --------------------------------------------------------------------------------------------- the analysis

def group_size(n_sources: int, d: int, t: int, e: int, memory_gib: float) -> int:
    """Source layers per pass so that ~36·t·d·e + 16·d² bytes per source layer (see module docs) fit the budget."""
    per_source = 8 * (2 * (t * d * e + d * d) + 2 * t * d * e) + 4 * t * d * e
    return max(1, min(n_sources, int(memory_gib * 2**30 // per_source)))


def block_rows(g: int, d: int, t: int, e: int) -> int:
    """Token rows per product: TARGET_BLOCK_TOKENS, fewer when one float32 block would exceed BLOCK_BYTES."""
    return max(256, min(TARGET_BLOCK_TOKENS, BLOCK_BYTES // (4 * (g * d + t * e))))


def check_params(site: str, select: str, dtype: str, grid: np.ndarray, memory_gib: float) -> None:
    """Refuse parameter values the analysis cannot use, naming the valid ones."""
    if site not in SITES:
        raise DepthcacheError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
    if select not in ("source", "pair"):
        raise DepthcacheError(f"select must be 'source' (one penalty per shallow layer) or 'pair', not {select!r}")
    if dtype not in ("float32", "float64"):
        raise DepthcacheError(f"dtype must be 'float32' (fast) or 'float64' (exact products), not {dtype!r}")
    if grid.ndim != 1 or not grid.size or not np.all(grid > 0):
        raise DepthcacheError("grid must be a non-empty list of positive penalty multipliers, e.g. [1e-6, 1e-3, 1]")
    if memory_gib <= 0:
        raise DepthcacheError("memory_gib must be positive")


@dataclass
class Results:
    """Per-pair arrays filled group by group (a learning-curve point per row of the ``curve_*`` arrays)."""

    r2: np.ndarray
    rel_error: np.ndarray
    penalty: np.ndarray
    val_r2: np.ndarray
    candidates: np.ndarray
    intervals: dict[str, np.ndarray]
    curve_r2: np.ndarray
    curve_rel_error: np.ndarray
    curve_tokens: np.ndarray
    seconds: dict[str, float]
    group: int
    rows: int
    passes: int
    flops: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, ns: int, nt: int, candidates: int, points: int, group: int, rows: int) -> Results:
        """Arrays for ``ns`` × ``nt`` pairs, to be filled source group by source group."""
        pairs = (ns, nt)
        return cls(np.zeros(pairs), np.zeros(pairs), np.zeros(pairs), np.zeros((*pairs, candidates)),
                   np.zeros((ns, candidates)), {k: np.zeros(pairs) for k in ("r2_lo", "r2_hi", "rel_error_lo",
                                                                              "rel_error_hi")},
                   np.zeros((points, *pairs)), np.zeros((points, *pairs)), np.zeros(points, dtype=np.int64), {},
                   group, rows, -(-ns // group))

    def add_seconds(self, key: str, seconds: float) -> None:
        """Time spent in one step, summed over groups."""
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds


def fit_statistics(stats: MapStats, points: Iterable[Moments], grid: np.ndarray, select: str, dtype: np.dtype,
                   rows: int, jackknife_groups: int, out: Results, sources: slice) -> None:
    """Solve and test the source layers of ``stats`` (the ones at ``sources`` of the result) against every target,
    at the final sums and at each learning-curve point (read one at a time when ``points`` is lazy), writing into
    ``out``."""
    clock = time.perf_counter()
    val = validation_sums(stats, rows, dtype)
    if stats.train.n < 2 or val.n < 1:
        raise DepthcacheError(f"too few tokens to fit maps ({stats.train.n} training, {val.n} validation): use more")
    tick = time.perf_counter()
    fits = [solve_source(stats.train, val, i, grid, select) for i in range(stats.shape[0])]
    tock = time.perf_counter()
    test = evaluate(stats, rows, dtype, fits, jackknife_groups)
    out.r2[sources], out.rel_error[sources] = test.metrics()
    for name, values in jackknife(test).items():
        out.intervals[name][sources] = values
    out.penalty[sources] = [f.penalties[f.chosen] for f in fits]
    out.val_r2[sources] = [f.val_r2 for f in fits]
    out.candidates[sources] = [f.penalties for f in fits]
    done = time.perf_counter()
    for p, point in enumerate(points):
        fits = [solve_source(point, val, i, grid, select) for i in range(stats.shape[0])]
        out.curve_r2[p, sources], out.curve_rel_error[p, sources] = evaluate(stats, rows, dtype, fits,
                                                                            jackknife_groups).metrics()
        out.curve_tokens[p] = point.n
    for key, seconds in (("validation", tick - clock), ("solve", tock - tick), ("test", done - tock),
                         ("curve", time.perf_counter() - done)):
        out.add_seconds(key, seconds)
    test_rows = int((stats.heldout_split == TEST).sum())
    out.counts = {"train": int(stats.train.n), "validation": int(val.n), "test": test_rows}


def fit_stores(x: da.Array, y: da.Array, split: np.ndarray, seq_id: np.ndarray, include_first: bool,
               penalties: np.ndarray, select: str, dtype: np.dtype, memory_gib: float, curve_start: int,
               jackknife_groups: int, save_stats: str | None,
               product_rows: int | None = None) -> tuple[Results, MapStats | None]:
    """Every pair of source layers x (s, n, d) and target layers y (t, n, e) of two stores, in groups of source
    layers (one pass over the training tokens each); the statistics of all sources when they fit in one group."""
    (ns, _, d), (nt, _, e) = x.shape, y.shape
    g = group_size(ns, d, nt, e, memory_gib)
    rows = product_rows or block_rows(g, d, nt, e)
    groups = [slice(a, min(a + g, ns)) for a in range(0, ns, g)]
    n_points = len([p for p in product_groups(training_rows(split, seq_id, include_first), rows, curve_start)
                    if p[2]])
    out = Results.empty(ns, nt, penalties.size, n_points, g, rows)
    kept = None
    held = int(np.isin(split, (VAL, TEST)).sum())
    steps = len(groups) * (len(product_groups(training_rows(split, seq_id, include_first), rows, curve_start))
                           + (n_points + 2) * -(-held // rows))
    with stage("layer-map", steps, "blocks"):
        for sources in groups:
            clock = time.perf_counter()
            stats, points = store_statistics(x[sources], y, split, seq_id, include_first, dtype, rows, curve_start)
            out.add_seconds("accumulate", time.perf_counter() - clock)
            out.flops += stats.attrs["accumulate_gflop"] * 1e9
            fit_statistics(stats, points, penalties, select, dtype, rows, jackknife_groups, out, sources)
            kept = (stats, points) if len(groups) == 1 else None
    if save_stats and kept is None:
        raise DepthcacheError("save_stats needs every source layer in one pass: raise memory_gib")
    return out, kept


def split_rows_like_map_stats(seq_id: np.ndarray, include_first: bool, test_tokens: int,
                              val_tokens: int) -> np.ndarray:
    """Per token: the split map-stats makes (whole windows in hash order until ``test_tokens`` test rows, then
    ``val_tokens`` validation rows), EXCLUDED before position 1 unless ``include_first``."""
    starts = window_starts(seq_id)
    first = 0 if include_first else 1
    per_window = split_by_rows(window_rows(np.diff(starts), include_first), test_tokens, val_tokens)
    split = np.repeat(per_window, np.diff(starts))
    position = np.arange(len(seq_id)) - np.repeat(starts[:-1], np.diff(starts))
    return np.where(position >= first, split, EXCLUDED).astype(np.int8)


def training_rows(split: np.ndarray, seq_id: np.ndarray, include_first: bool) -> np.ndarray:
    """Rows of each training window of a store, in order."""
    starts = window_starts(seq_id)
    first = 0 if include_first else 1
    lengths = np.diff(starts)
    has = lengths > first
    window_split = np.full(len(lengths), EXCLUDED, dtype=np.int8)
    window_split[has] = split[starts[:-1][has] + first]
    return lengths[window_split == TRAIN] - first


def to_dataset(out: Results, xl: np.ndarray, yl: np.ndarray, shallow_layers: int, deep_layers: int,
               attrs: dict[str, Any]) -> xr.Dataset:
    """The labelled result: per pair r2, rel_error (with jackknife intervals), penalty, validation R² per
    candidate; best shallow layer; the learning curve."""
    pair = ("shallow_layer", "deep_layer")
    return xr.Dataset(
        {"r2": (pair, out.r2), "rel_error": (pair, out.rel_error), "penalty": (pair, out.penalty),
         **{name: (pair, values) for name, values in out.intervals.items()},
         "validation_r2": ((*pair, "candidate"), out.val_r2),
         "candidate_penalty": (("shallow_layer", "candidate"), out.candidates),
         "best_shallow_layer": ("deep_layer", xl[np.argmin(out.rel_error, axis=0)]),
         "curve_r2": (("curve_tokens", *pair), out.curve_r2),
         "curve_rel_error": (("curve_tokens", *pair), out.curve_rel_error)},
        coords={"shallow_layer": xl, "deep_layer": yl, "curve_tokens": out.curve_tokens,
                "shallow_relative_depth": ("shallow_layer", xl / shallow_layers),
                "deep_relative_depth": ("deep_layer", yl / deep_layers)},
        attrs=attrs | {f"{k}_tokens": v for k, v in out.counts.items()}
        | {f"{k}_seconds": round(v, 3) for k, v in out.seconds.items()} | {"accumulate_gflop": out.flops / 1e9})


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """Heatmaps of rel_error and R² over relative depth (deep: x, shallow: y), best shallow layer marked; with a
    learning curve, R² of each deep layer's best pair against training tokens."""
    fig, axes = plotting.figure(2, width=5.2, height=4.6)
    x, y = result.deep_relative_depth.values, result.shallow_relative_depth.values
    best = result.shallow_relative_depth.sel(shallow_layer=result.best_shallow_layer).values
    panels = ((axes[0], "rel_error", "mean ‖ŷ − y‖ / ‖y‖ (lower is better)", "viridis_r"),
              (axes[1], "r2", "R²", "viridis"))
    for ax, name, label, cmap in panels:
        image = ax.pcolormesh(x, y, result[name].values, shading="nearest", cmap=cmap)
        ax.plot(x, best, "r.", ms=7, label="best shallow layer")
        ax.plot([0, 1], [0, 1], "w--", lw=0.8, label="equal relative depth")
        ax.set(xlabel="deep model: relative depth", ylabel="shallow model: relative depth", title=label)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    plotting.legend_outside(axes[0], below=True)
    fig.suptitle(plotting.model_title(result.attrs, f"Linear maps shallow → deep ({result.attrs['site']}, "
                                                    f"{result.attrs['test_tokens']} test tokens)"), fontsize=9)
    paths = [plotting.save(fig, folder, "layer-map")]
    if result.sizes.get("curve_tokens", 0) > 1:
        paths.append(plot_curve(result, folder))
    return paths


def plot_curve(result: xr.Dataset, folder: Path) -> Path:
    """Held-out R² of each deep layer's best pair (at the full count) against training tokens, log-scaled."""
    fig, axes = plotting.figure(1, width=6.0, height=4.2)
    ax = axes[0]
    tokens = np.append(result.curve_tokens.values, result.attrs["train_tokens"])
    colors = plotting.pyplot().cm.viridis(np.linspace(0, 0.9, result.sizes["deep_layer"]))
    for j, deep in enumerate(result.deep_layer.values):
        shallow = int(result.best_shallow_layer.values[j])
        values = np.append(result.curve_r2.sel(shallow_layer=shallow, deep_layer=deep).values,
                           result.r2.sel(shallow_layer=shallow, deep_layer=deep).values)
        ax.plot(tokens, values, marker=".", lw=1, color=colors[j],
                label=f"deep {deep} ← shallow {shallow}")
    ax.set(xscale="log", xlabel="training tokens", ylabel="held-out R²",
           title="Learning curve: each deep layer's best map")
    plotting.legend_outside(ax)
    return plotting.save(fig, folder, "layer-map-curve")


def result_attrs(site: str, select: str, dtype: str, penalties: np.ndarray, out: Results,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """The attributes every layer-map result carries."""
    return {"site": site, "select": select, "dtype": dtype, "grid": penalties.tolist(), "passes": out.passes,
            "sources_per_pass": out.group, "block_rows": out.rows,
            "penalty_rule": "candidate penalties = grid * mean eigenvalue of the centered training Gram",
            "intervals": "delete-one-group jackknife over groups of whole test windows, Student t, 95 %",
            "test_metric": "R² and mean ‖ŷ−y‖/‖y‖ from the held-out test rows"} | extra


@analysis("layer-map", "Ridge maps from each shallow-model layer to each deep-model layer (same tokens): "
          "held-out ‖ŷ−y‖/‖y‖ and R² per pair, with jackknife intervals.", n_stores=2, plot=plot)
def layer_map(shallow: Store, deep: Store, site: str = "resid", select: str = "source",
              grid: list[float] | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
              include_first: bool = False, dtype: str = "float32", memory_gib: Positive = 4.0,
              max_tokens: Count | None = None, shallow_layers: str = "all", deep_layers: str = "all",
              curve_start: int = 0, jackknife_groups: Count = JACKKNIFE_GROUPS, product_rows: Count | None = None,
              test_tokens: Count | None = None, val_tokens: Count | None = None,
              save_stats: str | None = None) -> xr.Dataset:
    """Fit, select and test an affine ridge map for every (shallow boundary, deep boundary) pair of the layer specs
    ``shallow_layers`` and ``deep_layers`` (for resid, L names the final residual) out of core, on the first
    ``max_tokens`` tokens (all by default; the split stays by whole windows among them); ``curve_start`` > 0 adds a
    learning curve at curve_start × 2^k training tokens; ``product_rows`` sets the product groups (default: ≤ 4,096
    rows, as map-stats forms them); ``test_tokens`` and ``val_tokens`` (both) hold out windows as map-stats does
    instead of by fraction; ``save_stats`` writes the statistics as a folder that
    ``analyze layer-map S`` fits alone."""
    penalties = np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64)
    check_params(site, select, dtype, penalties, memory_gib)
    check_same_tokens(shallow, deep)
    x, xl = boundaries(shallow, site, shallow_layers)
    y, yl = boundaries(deep, site, deep_layers)
    n = x.shape[1] if max_tokens is None else min(int(max_tokens), x.shape[1])
    x, y = x[:, :n], y[:, :n]
    seq_id, position = deep.ds.seq_id.values[:n], deep.ds.position.values[:n]
    if test_tokens is not None and val_tokens is not None:
        split = split_rows_like_map_stats(seq_id, include_first, test_tokens, val_tokens)
    else:
        split = split_tokens(seq_id, position, val_fraction, test_fraction, include_first)
    out, kept = fit_stores(x, y, split, seq_id, include_first, penalties, select, np.dtype(dtype), memory_gib,
                           curve_start, jackknife_groups, save_stats, product_rows)
    attrs = result_attrs(site, select, dtype, penalties, out, {
        "include_first": int(include_first), "val_fraction": val_fraction, "test_fraction": test_fraction,
        "tokens": int(n), "split": "whole windows ranked by (seq_id * 0x9E3779B1) mod 2**32: first test_fraction "
                                   "test, next val_fraction validation, rest training"})
    if save_stats:
        stats, points = kept
        stats.attrs |= store_pair_attrs(shallow, deep, site, xl, yl, include_first, dtype, curve_start,
                                        out.rows)
        write_statistics(Path(save_stats), stats, points)
    return to_dataset(out, xl, yl, shallow.n_layers, deep.n_layers, attrs)


def store_pair_attrs(shallow: Store, deep: Store, site: str, xl: np.ndarray, yl: np.ndarray, include_first: bool,
                     dtype: str, curve_start: int, product_rows: int) -> dict[str, Any]:
    """The provenance of statistics built from two stores, in the keys a live run records."""
    def model(store: Store) -> dict[str, Any]:
        m = store.attrs["model"]
        return {"name": m.get("display_name") or m.get("spec"), "weights_sha256": m.get("weights_sha256"),
                "n_layers": store.n_layers}

    return {"shallow": model(shallow), "deep": model(deep),
            "tokenizer_sha256": deep.attrs["model"].get("tokenizer_sha256"),
            "dataset": {k: deep.attrs["dataset"].get(k) for k in ("name", "sha256")},
            "seq_len": deep.attrs.get("extraction", {}).get("seq_len"), "site": site,
            "shallow_layers": xl.tolist(), "deep_layers": yl.tolist(), "include_first": bool(include_first),
            "split": "store fractions", "curve_start": curve_start, "product_rows": product_rows, "accumulation": f"{dtype} products, float64 sums",
            "source": "stores", "stores": [shallow.location, deep.location]}


def write_statistics(path: Path, stats: MapStats, points: list[Moments]) -> None:
    """A statistics folder holding ``stats`` (held-out rows materialized) and its learning-curve points."""
    if path.exists():
        raise DepthcacheError(f"{path} exists: save statistics into a new folder")
    create_stats(path, stats.attrs)
    for point in points:
        save_curve_point(path, point, stats.shape)
    save_checkpoint(path, stats)


def fitted_statistics(path: str, force: bool = False, **params: Any) -> xr.Dataset:
    """``layer_map_from_statistics`` cached inside the statistics folder (``fits/KEY``, one per parameter set; a
    complete folder never changes, so an entry stays valid): ``analyze`` then ``plot`` fit once."""
    if not is_stats(Path(path)):
        return layer_map_from_statistics(path, **params)  # refused there, in one line
    full = {k: p.default for k, p in inspect.signature(layer_map_from_statistics).parameters.items()
            if p.default is not inspect.Parameter.empty} | params
    folder = Path(path) / "fits" / entry_key(json.loads(canonical(full)))
    if folder.is_dir() and not force:
        return open_result(str(folder)).load()
    result = layer_map_from_statistics(path, **params)
    if can_write(Path(path)):  # a read-only (shared) folder is fitted again each time
        write_dataset_atomically(result, folder)
    return result


def layer_map_from_statistics(path: str | Path, select: str = "source", grid: list[float] | None = None,
                              dtype: str = "float32", jackknife_groups: int = JACKKNIFE_GROUPS,
                              memory_gib: float = 4.0) -> xr.Dataset:
    """Fit every pair of a statistics folder (``depthcache map-stats``) from it alone: penalties chosen on its
    validation rows, R², the paper's metric and jackknife intervals on its test rows, a learning curve from its
    curve points; source layers in groups whose sums fit ``memory_gib``, each group's sums read alone."""
    penalties = np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64)
    check_params("resid", select, dtype, penalties, memory_gib)
    path = Path(path)
    if not is_stats(path):
        raise DepthcacheError(f"layer-map takes two stores (SHALLOW DEEP) or one statistics folder made by "
                              f"depthcache map-stats; {path} is not a statistics folder")
    stats = load_stats(path, sources=slice(0, 1))
    if not stats.progress.get("complete"):
        raise DepthcacheError(f"{path} is unfinished (its run stopped); finish it with --resume, or merge workers")
    a = read_stats_attrs(path)
    g, (d, t, e) = len(a["shallow_layers"]), stats.shape[1:]
    per = group_size(g, d, t, e, memory_gib)
    rows = block_rows(per, d, t, e)
    folders = curve_folders(path)
    out = Results.empty(g, t, penalties.size, len(folders), per, rows)
    held = np.bincount(stats.heldout_split, minlength=3)
    steps = -(-g // per) * (-(-int(held[VAL]) // rows) + (len(folders) + 1) * -(-int(held[TEST]) // rows))
    with stage("layer-map", steps, "blocks"):
        for first in range(0, g, per):
            group = slice(first, min(first + per, g))
            fit_statistics(load_stats(path, sources=group), (curve_point(f, group) for f in folders), penalties,
                           select, np.dtype(dtype), rows, jackknife_groups, out, group)
    attrs = result_attrs(a.get("site", "resid"), select, dtype, penalties, out, {
        "include_first": int(a.get("include_first", False)), "statistics": str(path),
        "depthcache_analysis": json.dumps({"models": [a["shallow"]["name"], a["deep"]["name"]],
                                           "source_locations": [str(path)]}), "split": json.dumps(a.get("split")),
        "tokens": int(stats.train.n + len(stats.heldout_split))})
    xl, yl = np.asarray(a["shallow_layers"]), np.asarray(a["deep_layers"])
    return to_dataset(out, xl, yl, a["shallow"]["n_layers"], a["deep"]["n_layers"], attrs)
