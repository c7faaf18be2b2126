"""layer-map: affine maps from a shallow model's residual stream to a deeper model's, for every layer pair (docs/analyses.md).

Both stores must hold the same tokens (same tokenizer, data and windows). Sources are the shallow model's residual
boundaries i (the inputs of its stored layers, then the residual after its last layer), targets the deep model's
boundaries j (``site="attn"``/``"mlp"``: the sublayer outputs instead). Tokens are split by window (``seq_id``):
windows are ranked by a fixed integer hash of their id; the first ``test_fraction`` of them form the test split,
the next ``val_fraction`` the validation split, the rest the training split (position 0 is left out unless
``include_first``).

Exact out-of-core scheme (one pass over the training and validation tokens, one over the test tokens):
1. Accumulate, in float64 over blocks of token rows cast to float32 (``dtype="float64"``: float64 blocks), per
   split: the token count, Σx per source, Σy and Σ‖y‖² per target, XᵀX per source and XᵀY per pair. Rows are shifted by
   the first block's mean per layer first, so the later centering does not cancel large common offsets.
2. Per source layer: one eigendecomposition C = V diag(λ) Vᵀ of the centered training Gram; the ridge solution
   for penalty α (centered, i.e. an intercept as in scikit-learn's ``fit_intercept=True``) is
   W(α) = V diag(1/(λ+α)) Vᵀ Cxy for every target at once. The validation error of every candidate penalty
   follows in d×d space from the validation sums: SSE(α) = Syy − 2 tr(Wᵀ Gxy) + tr(Wᵀ Gxx W) in the eigenbasis.
   Candidate penalties are ``grid`` × the mean eigenvalue tr(C)/d of that source layer; the penalty is chosen per
   source layer (``select="source"``: best mean validation R² over the targets) or per pair
   (``select="pair"``).
3. Test metrics for the chosen maps come from one pass over the test tokens only: R² = 1 − SSE/SST over all
   dimensions (SST about the test mean; scikit-learn's ``r2_score(..., multioutput="variance_weighted")``) and the
   paper's metric, the mean over tokens of ‖ŷ − y‖/‖y‖, which no Gram sum can give.

Memory: source layers are processed in groups of g so that the float64 sums of one group (2 splits × g × (T + 1)
d×d-sized blocks for T targets), one float32 block product (g × T blocks) and the group's maps (g × T blocks) fit in
``memory_gib``; each group is one pass over the data (all groups: the same FLOPs as one pass).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
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
from depthcache.store.reader import Store

SITES = {"resid": ("resid_pre", "resid_final"), "attn": ("attn_out",), "mlp": ("mlp_out",)}
DEFAULT_GRID = tuple(float(g) for g in np.logspace(-7, 1, 9))
TARGET_BLOCK_TOKENS = 4096
BLOCK_BYTES = 256 * 2**20  # float32 bytes of one block of rows (all source and target layers)
TRAIN, VAL, TEST, EXCLUDED = 0, 1, 2, -1
HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash: a fixed, well-spread order of window ids
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


# tokenizer files (and tokenizer_config.json keys) that only format conversations: a chat template that differs by
# one escape must not make two releases of one tokenizer (Qwen2.5-Coder 0.5B and 1.5B GGUFs) look different
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def tokenization_files(store: Store) -> dict[str, bytes]:
    """The store's tokenizer files that decide how text becomes ids: all but the chat template (its own file, or the
    ``chat_template`` entry of tokenizer_config.json). The files' sha256 is checked against the recorded one."""
    files = {k: v for k, v in tokenizer_files(store.group, store.attrs).items() if k not in CHAT_TEMPLATE_FILES}
    if "tokenizer_config.json" in files:
        try:
            config = json.loads(files["tokenizer_config.json"])
        except ValueError:
            return files
        if isinstance(config, dict):
            config.pop("chat_template", None)
            files["tokenizer_config.json"] = json.dumps(config, sort_keys=True).encode()
    return files


def same_tokenizer(shallow: Store, deep: Store) -> bool:
    """Whether two stores tokenize alike: the same recorded tokenizer hash, or the same stored tokenizer files apart
    from the chat template."""
    if not differences(shallow.attrs, deep.attrs, ("tokenizer",)):
        return True
    try:
        return tokenization_files(shallow) == tokenization_files(deep)
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

@dataclass
class Moments:
    """Sums over one split's token rows in shifted coordinates, float64: the sufficient statistics of ridge."""

    n: int
    sx: np.ndarray   # (g, d)      Σx per source layer
    gxx: np.ndarray  # (g, d, d)   XᵀX per source layer
    sy: np.ndarray   # (t, e)      Σy per target layer
    syy: np.ndarray  # (t,)        Σ‖y‖² per target layer
    gxy: np.ndarray  # (g·d, t·e)  XᵀY of every pair

    @classmethod
    def zeros(cls, g: int, d: int, t: int, e: int) -> Moments:
        """Empty sums for g source layers of width d and t target layers of width e."""
        return cls(0, np.zeros((g, d)), np.zeros((g, d, d)), np.zeros((t, e)), np.zeros(t), np.zeros((g * d, t * e)))

    def add(self, x: np.ndarray, y: np.ndarray) -> float:
        """Add rows x (K, g, d) and y (K, t, e) (already shifted); returns the FLOPs of the products."""
        k, g, d = x.shape
        xf, yf = x.reshape(k, g * d), y.reshape(k, -1)
        self.n += k
        self.sx += x.sum(axis=0, dtype=np.float64)
        self.sy += y.sum(axis=0, dtype=np.float64)
        self.syy += np.square(y).sum(axis=(0, 2), dtype=np.float64)
        self.gxy += xf.T @ yf
        for i in range(g):
            self.gxx[i] += x[:, i].T @ x[:, i]
        return 2.0 * k * g * d * (yf.shape[1] + d)

    def pair(self, i: int, t: int) -> np.ndarray:
        """XᵀY of source i with every target: (d, t, e)."""
        d = self.sx.shape[1]
        return self.gxy[i * d:(i + 1) * d].reshape(d, t, -1)


@dataclass
class Shift:
    """Per-layer offsets subtracted from every row before products (the first block's mean; exact algebra)."""

    x: np.ndarray  # (g, d)
    y: np.ndarray  # (t, e)


def read_blocks(x: da.Array, y: da.Array, block_tokens: int,
                dtype: np.dtype) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Yield (token slice, x rows (K, g, d), y rows (K, t, e)) cast to ``dtype``, one dask compute per block."""
    n = x.shape[1]
    for start in range(0, n, block_tokens):
        window = slice(start, min(start + block_tokens, n))
        xb, yb = dask.compute(x[:, window].astype(dtype), y[:, window].astype(dtype))
        advance()
        yield window, np.ascontiguousarray(xb.transpose(1, 0, 2)), np.ascontiguousarray(yb.transpose(1, 0, 2))


@dataclass
class RowBuffer:
    """Rows of one split gathered across blocks, so each product has at least ``rows`` rows (GEMM-efficient)."""

    rows: int
    xs: list[np.ndarray] = field(default_factory=list)
    ys: list[np.ndarray] = field(default_factory=list)

    def push(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Add rows; return all buffered rows once there are at least ``rows`` of them."""
        if len(x):
            self.xs.append(x)
            self.ys.append(y)
        return self.take() if sum(len(a) for a in self.xs) >= self.rows else None

    def take(self) -> tuple[np.ndarray, np.ndarray] | None:
        """All buffered rows (None if empty), emptying the buffer."""
        if not self.xs:
            return None
        out = (np.concatenate(self.xs), np.concatenate(self.ys))
        self.xs, self.ys = [], []
        return out


def first_shift(x: np.ndarray, y: np.ndarray) -> Shift:
    """Mean of the first block's rows per layer, in the rows' dtype."""
    return Shift(x.mean(axis=0, dtype=np.float64).astype(x.dtype), y.mean(axis=0, dtype=np.float64).astype(y.dtype))


def accumulate(x: da.Array, y: da.Array, split: np.ndarray, block_tokens: int,
               dtype: np.dtype) -> tuple[Moments, Moments, Shift, float]:
    """One pass over the training and validation tokens: (train sums, validation sums, shift, product FLOPs)."""
    g, _, d = x.shape
    t, _, e = y.shape
    moments = {TRAIN: Moments.zeros(g, d, t, e), VAL: Moments.zeros(g, d, t, e)}
    buffers = {s: RowBuffer(block_tokens) for s in moments}
    shift, flops = None, 0.0
    used = np.flatnonzero((split == TRAIN) | (split == VAL))
    for window, xb, yb in read_blocks(x[:, used], y[:, used], block_tokens, dtype):
        part = split[used][window]
        shift = shift or first_shift(xb, yb)
        for s, buffer in buffers.items():
            rows = buffer.push(xb[part == s] - shift.x, yb[part == s] - shift.y)
            flops += moments[s].add(*rows) if rows else 0.0
    for s, buffer in buffers.items():
        rows = buffer.take()
        flops += moments[s].add(*rows) if rows else 0.0
    return moments[TRAIN], moments[VAL], shift, flops


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
    """Sums over test rows for the chosen maps (float64): count, SSE and Σ‖ŷ−y‖/‖y‖ per pair, target sums."""

    n: int
    sse: np.ndarray      # (g, t)
    rel: np.ndarray      # (g, t)
    sy: np.ndarray       # (t, e)
    syy: np.ndarray      # (t,)

    def add(self, x: np.ndarray, y: np.ndarray, y_norm: np.ndarray, maps: list[np.ndarray],
            means: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Predict the rows y (K, t, e) from x (K, g, d) with each source's maps (d, t·e) and add the errors."""
        k, t, e = y.shape
        self.n += k
        self.sy += y.sum(axis=0, dtype=np.float64)
        self.syy += np.square(y).sum(axis=(0, 2), dtype=np.float64)
        for i, (w, (mx, my)) in enumerate(zip(maps, means)):
            err = ((x[:, i] - mx.astype(x.dtype)) @ w).reshape(k, t, e) + (my.astype(x.dtype) - y)
            sq = np.square(err).sum(axis=2, dtype=np.float64)
            self.sse[i] += sq.sum(axis=0)
            self.rel[i] += (np.sqrt(sq) / np.maximum(y_norm, TINY)).sum(axis=0)


def evaluate(x: da.Array, y: da.Array, split: np.ndarray, block_tokens: int, dtype: np.dtype, shift: Shift,
             fits: list[SourceFit]) -> TestSums:
    """One pass over the test tokens only: SSE, Σ‖ŷ−y‖/‖y‖ and target sums for each source's chosen maps."""
    g, t, e = x.shape[0], y.shape[0], y.shape[2]
    maps = [f.weights(f.chosen).transpose(1, 0, 2).reshape(-1, t * e).astype(dtype) for f in fits]
    means = [(f.mean_x, f.mean_y) for f in fits]
    sums = TestSums(0, np.zeros((g, t)), np.zeros((g, t)), np.zeros((t, e)), np.zeros(t))
    test = np.flatnonzero(split == TEST)
    for _, xb, yb in read_blocks(x[:, test], y[:, test], block_tokens, dtype):
        y_norm = np.sqrt(np.square(yb).sum(axis=2, dtype=np.float64))
        sums.add(xb - shift.x, yb - shift.y, y_norm, maps, means)
    return sums


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
    """Per-pair arrays filled group by group."""

    r2: np.ndarray
    rel_error: np.ndarray
    penalty: np.ndarray
    val_r2: np.ndarray
    candidates: np.ndarray
    seconds: dict[str, float]
    group: int
    rows: int
    passes: int
    flops: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def fit_group(x: da.Array, y: da.Array, split: np.ndarray, grid: np.ndarray, select: str, dtype: np.dtype,
              rows: int, out: Results, sources: slice) -> None:
    """Accumulate, solve and test the source layers ``sources`` against every target, writing into ``out``."""
    clock = time.perf_counter()
    train, val, shift, flops = accumulate(x, y, split, rows, dtype)
    if train.n < 2 or val.n < 1:
        raise DepthcacheError(f"too few tokens to fit maps ({train.n} training, {val.n} validation): extract more")
    tick = time.perf_counter()
    fits = [solve_source(train, val, i, grid, select) for i in range(x.shape[0])]
    del train, val
    tock = time.perf_counter()
    test = evaluate(x, y, split, rows, dtype, shift, fits)
    sst = test.syy - np.einsum("te,te->t", test.sy, test.sy) / test.n
    out.r2[sources] = 1 - test.sse / np.maximum(sst, TINY)
    out.rel_error[sources] = test.rel / test.n
    out.penalty[sources] = [f.penalties[f.chosen] for f in fits]
    out.val_r2[sources] = [f.val_r2 for f in fits]
    out.candidates[sources] = [f.penalties for f in fits]
    out.flops += flops
    for key, seconds in (("accumulate", tick - clock), ("solve", tock - tick), ("test", time.perf_counter() - tock)):
        out.seconds[key] = out.seconds.get(key, 0.0) + seconds
    out.counts = {"train": int((split == TRAIN).sum()), "validation": int((split == VAL).sum()),
                  "test": int((split == TEST).sum())}


def fit_all(x: da.Array, y: da.Array, split: np.ndarray, penalties: np.ndarray, select: str, dtype: np.dtype,
            memory_gib: float) -> Results:
    """Every pair of source layers x (s, n, d) and target layers y (t, n, e), in groups of source layers."""
    (ns, _, d), (nt, _, e) = x.shape, y.shape
    g = group_size(ns, d, nt, e, memory_gib)
    rows = block_rows(g, d, nt, e)
    out = Results(np.zeros((ns, nt)), np.zeros((ns, nt)), np.zeros((ns, nt)), np.zeros((ns, nt, penalties.size)),
                  np.zeros((ns, penalties.size)), {}, g, rows, -(-ns // g))
    blocks = sum(-(-int(n) // rows) for n in (np.isin(split, (TRAIN, VAL)).sum(), (split == TEST).sum()))
    with stage("layer-map", out.passes * blocks, "blocks"):
        for start in range(0, ns, g):
            fit_group(x[start:start + g], y, split, penalties, select, dtype, rows, out, slice(start, start + g))
    return out


def to_dataset(out: Results, shallow: Store, deep: Store, xl: np.ndarray, yl: np.ndarray,
               attrs: dict[str, Any]) -> xr.Dataset:
    """The labelled result: per pair r2, rel_error, penalty, validation R² per candidate; best shallow layer."""
    pair = ("shallow_layer", "deep_layer")
    return xr.Dataset(
        {"r2": (pair, out.r2), "rel_error": (pair, out.rel_error), "penalty": (pair, out.penalty),
         "validation_r2": ((*pair, "candidate"), out.val_r2),
         "candidate_penalty": (("shallow_layer", "candidate"), out.candidates),
         "best_shallow_layer": ("deep_layer", xl[np.argmin(out.rel_error, axis=0)])},
        coords={"shallow_layer": xl, "deep_layer": yl,
                "shallow_relative_depth": ("shallow_layer", xl / shallow.n_layers),
                "deep_relative_depth": ("deep_layer", yl / deep.n_layers)},
        attrs=attrs | {f"{k}_tokens": v for k, v in out.counts.items()}
        | {f"{k}_seconds": round(v, 3) for k, v in out.seconds.items()} | {"accumulate_gflop": out.flops / 1e9})


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """Heatmaps of rel_error and R² over relative depth (deep: x, shallow: y), best shallow layer marked."""
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
    return [plotting.save(fig, folder, "layer-map")]


@analysis("layer-map", "Ridge maps from each shallow-model layer to each deep-model layer (same tokens): "
          "held-out ‖ŷ−y‖/‖y‖ and R² per pair.", n_stores=2, plot=plot)
def layer_map(shallow: Store, deep: Store, site: str = "resid", select: str = "source",
              grid: list[float] | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
              include_first: bool = False, dtype: str = "float32", memory_gib: Positive = 4.0,
              max_tokens: Count | None = None, shallow_layers: str = "all", deep_layers: str = "all") -> xr.Dataset:
    """Fit, select and test an affine ridge map for every (shallow boundary, deep boundary) pair of the layer specs
    ``shallow_layers`` and ``deep_layers`` (for resid, L names the final residual) out of core, on the first
    ``max_tokens`` tokens (all by default; the split stays by whole windows among them)."""
    penalties = np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64)
    check_params(site, select, dtype, penalties, memory_gib)
    check_same_tokens(shallow, deep)
    x, xl = boundaries(shallow, site, shallow_layers)
    y, yl = boundaries(deep, site, deep_layers)
    n = x.shape[1] if max_tokens is None else min(int(max_tokens), x.shape[1])
    x, y = x[:, :n], y[:, :n]
    split = split_tokens(deep.ds.seq_id.values[:n], deep.ds.position.values[:n], val_fraction, test_fraction,
                         include_first)
    out = fit_all(x, y, split, penalties, select, np.dtype(dtype), memory_gib)
    attrs = {"site": site, "select": select, "dtype": dtype, "include_first": int(include_first),
             "grid": penalties.tolist(), "val_fraction": val_fraction, "test_fraction": test_fraction,
             "passes": out.passes, "sources_per_pass": out.group, "block_rows": out.rows, "tokens": int(n),
             "split": "whole windows ranked by (seq_id * 0x9E3779B1) mod 2**32: first test_fraction test, next "
                      "val_fraction validation, rest training",
             "penalty_rule": "candidate penalties = grid * mean eigenvalue of the centered training Gram"}
    return to_dataset(out, shallow, deep, xl, yl, attrs)
