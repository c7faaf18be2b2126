"""The layer-map statistics file: the exactly mergeable sums behind every shallow → deep ridge map, with a bounded
slice of held-out rows and provenance (docs/store-format.md "Layer-map statistics").

Ridge needs only sums over the training tokens: the count, Σx and XᵀX per source boundary, Σy and Σ‖y‖² per target
boundary, XᵀY per pair. Sums over disjoint tokens add up, across batches, workers and machines, so activations are
never stored: ``depthcache map-stats`` accumulates them from two live models, ``analyze layer-map A B`` from two
stores, and either is fitted by ``analyze layer-map S``. All rows are shifted by one fixed vector per boundary (the
mean of the first window's rows) before any product, so centering later does not cancel large common offsets; files
merge only with the same shift.

Products are formed over *product groups* of whole training windows (a group closes once it holds
``product_rows`` rows, or at a learning-curve point), in float32 summed into float64: the groups are a pure function
of the windows, so two runs over the same windows (live or stored, resumed or not) form the same products.

A statistics folder S holds ``zarr.json`` (schema and provenance), ``sums/`` (the latest checkpoint: the sums, the
held-out rows and how far the run got, replaced atomically) and ``curve/<tokens>/`` (the training sums at each
learning-curve point, written once).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import zarr

from depthcache.errors import DepthcacheError
from depthcache.store.io import ATTRS_KEY, open_result, write_attrs, write_dataset_atomically
from depthcache.store.schema import error_message, load_schema

STATS_SCHEMA = "depthcache-map-stats"
STATS_VERSION = "1.0"
TRAIN, VAL, TEST, EXCLUDED = 0, 1, 2, -1
HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash: a fixed, well-spread order of window ids
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# attributes that must agree for two statistics files to be merged or compared
IDENTITY_KEYS = ("shallow", "deep", "tokenizer_sha256", "dataset", "seq_len", "site", "shallow_layers",
                 "deep_layers", "include_first", "split", "product_rows", "curve_start", "accumulation")


# ------------------------------------------------------------------------------------------------------ the sums

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
        """Add rows x (K, g, d) and y (K, t, e) (already shifted), products in the rows' dtype summed into float64
        one source layer at a time (a d × t·e temporary); returns the FLOPs of the products."""
        k, g, d = x.shape
        yf = y.reshape(k, -1)
        self.n += k
        self.sx += x.sum(axis=0, dtype=np.float64)
        self.sy += y.sum(axis=0, dtype=np.float64)
        self.syy += np.square(y).sum(axis=(0, 2), dtype=np.float64)
        for i in range(g):
            xi = np.ascontiguousarray(x[:, i])
            self.gxy[i * d:(i + 1) * d] += xi.T @ yf
            self.gxx[i] += xi.T @ xi
        return 2.0 * k * g * d * (yf.shape[1] + d)

    def pair(self, i: int, t: int) -> np.ndarray:
        """XᵀY of source i with every target: (d, t, e)."""
        d = self.sx.shape[1]
        return self.gxy[i * d:(i + 1) * d].reshape(d, t, -1)

    def plus(self, other: Moments) -> Moments:
        """The sums of both token sets (disjoint tokens: the sums of their union)."""
        return Moments(self.n + other.n, self.sx + other.sx, self.gxx + other.gxx, self.sy + other.sy,
                       self.syy + other.syy, self.gxy + other.gxy)

    def sources(self, first: int, last: int) -> Moments:
        """The sums of source layers first..last-1 only (targets unchanged)."""
        d = self.sx.shape[1]
        return Moments(self.n, self.sx[first:last], self.gxx[first:last], self.sy, self.syy,
                       self.gxy[first * d:last * d])


@dataclass
class Shift:
    """Per-boundary offsets subtracted from every row before products (exact algebra; float32)."""

    x: np.ndarray  # (g, d)
    y: np.ndarray  # (t, e)


def shift_of(x: np.ndarray, y: np.ndarray) -> Shift:
    """The mean of rows x (K, g, d) and y (K, t, e) per boundary, computed in float64, kept in the rows' dtype."""
    return Shift(x.mean(axis=0, dtype=np.float64).astype(x.dtype), y.mean(axis=0, dtype=np.float64).astype(y.dtype))


def sums_bytes(g: int, d: int, t: int, e: int) -> int:
    """Bytes of one float64 Moments of g sources and t targets (what a run holds in memory, per copy)."""
    return 8 * (g * d * (d + 1) + g * d * t * e + t * (e + 1))


# -------------------------------------------------------------------------------------------- windows and groups

def window_rows(lengths: Sequence[int], include_first: bool) -> np.ndarray:
    """Rows each window contributes: its tokens, less position 0 unless ``include_first``."""
    return np.maximum(np.asarray(lengths, dtype=np.int64) - (0 if include_first else 1), 0)


def hash_order(windows: np.ndarray) -> np.ndarray:
    """Window ids in a fixed pseudo-random order (a multiplicative hash of the id): held-out windows are drawn from
    the front."""
    return windows[np.argsort((windows.astype(np.uint64) * HASH_MULTIPLIER) % 2**32, kind="stable")]


def split_by_rows(rows: np.ndarray, test_rows: int, val_rows: int) -> np.ndarray:
    """Per window: TEST for the first windows in hash order until ``test_rows`` rows are held out, VAL for the next
    until ``val_rows`` more, TRAIN for the rest (windows without rows: EXCLUDED)."""
    split = np.full(len(rows), TRAIN, dtype=np.int8)
    taken = {TEST: 0, VAL: 0}
    for w in hash_order(np.flatnonzero(rows > 0)):
        role = TEST if taken[TEST] < test_rows else VAL if taken[VAL] < val_rows else None
        if role is None:
            break
        split[w] = role
        taken[role] += int(rows[w])
    split[rows == 0] = EXCLUDED
    if not taken[TEST] or not taken[VAL] or not np.any(split == TRAIN):
        raise DepthcacheError(f"only {int((rows > 0).sum())} windows with tokens: test, validation and training "
                              "each need at least one; stream more tokens (--max-tokens) or hold out fewer")
    return split


def product_groups(rows: Sequence[int], product_rows: int, curve_start: int) -> list[tuple[int, int, bool]]:
    """Cut training windows with ``rows`` rows each into product groups (first, last + 1, a curve point after it):
    a group closes once it holds ``product_rows`` rows, or when the running total first reaches a learning-curve
    point (``curve_start`` × 2^k rows; 0: none)."""
    groups, first, held, total = [], 0, 0, 0
    point = curve_start
    for w, r in enumerate(rows):
        held += int(r)
        total += int(r)
        at_point = bool(point) and total >= point
        while point and point <= total:
            point *= 2
        if held >= product_rows or at_point:
            groups.append((first, w + 1, at_point))
            first, held = w + 1, 0
    if first < len(rows):
        groups.append((first, len(rows), False))
    return groups


# ----------------------------------------------------------------------------------------------- the statistics

@dataclass
class MapStats:
    """One run's statistics: provenance and parameters, shift, training sums, held-out rows, progress."""

    attrs: dict[str, Any]
    shift: Shift
    train: Moments
    heldout_x: Any       # (g, n, d) float32 rows of the held-out windows (numpy, or lazy: dask)
    heldout_y: Any       # (t, n, e)
    heldout_window: np.ndarray  # (n,) window index of each row
    heldout_split: np.ndarray   # (n,) VAL or TEST
    progress: dict[str, Any] = field(default_factory=dict)  # windows done per range, products, curve points

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(g, d, t, e): source layers, source width, target layers, target width."""
        return (*self.shift.x.shape, *self.shift.y.shape)


def to_dataset(stats: MapStats) -> Any:
    """The statistics as one xarray Dataset (sums float64, rows float32), attributes as JSON."""
    import xarray as xr

    g, d, t, e = stats.shape
    m = stats.train
    return xr.Dataset(
        {"shift_x": (("source", "d"), stats.shift.x), "shift_y": (("target", "e"), stats.shift.y),
         "train_sx": (("source", "d"), m.sx), "train_gxx": (("source", "d", "d2"), m.gxx),
         "train_sy": (("target", "e"), m.sy), "train_syy": (("target",), m.syy),
         "train_gxy": (("source", "d", "target", "e"), m.gxy.reshape(g, d, t, e)),
         "heldout_x": (("source", "heldout", "d"), np.asarray(stats.heldout_x, dtype=np.float32)),
         "heldout_y": (("target", "heldout", "e"), np.asarray(stats.heldout_y, dtype=np.float32)),
         "heldout_window": (("heldout",), stats.heldout_window.astype(np.int64)),
         "heldout_split": (("heldout",), stats.heldout_split.astype(np.int8))},
        attrs={"train_n": int(m.n), "progress": json.dumps(stats.progress)})


def moments_dataset(m: Moments, g: int, d: int, t: int, e: int) -> Any:
    """Training sums alone (a learning-curve point) as an xarray Dataset."""
    import xarray as xr

    return xr.Dataset({"train_sx": (("source", "d"), m.sx), "train_gxx": (("source", "d", "d2"), m.gxx),
                       "train_sy": (("target", "e"), m.sy), "train_syy": (("target",), m.syy),
                       "train_gxy": (("source", "d", "target", "e"), m.gxy.reshape(g, d, t, e))},
                      attrs={"train_n": int(m.n)})


def moments_from(ds: Any, sources: slice = slice(None)) -> Moments:
    """Training sums of the source layers ``sources`` read from a dataset (only those chunks, every chunk's
    checksum verified on the way)."""
    gxy = ds.train_gxy[sources].values
    g, d, t, e = gxy.shape
    return Moments(int(ds.attrs["train_n"]), ds.train_sx[sources].values, ds.train_gxx[sources].values,
                   ds.train_sy.values, ds.train_syy.values, gxy.reshape(g * d, t * e))


def is_stats(location: str | Path) -> bool:
    """Whether ``location`` is a local layer-map statistics folder."""
    meta = Path(location) / "zarr.json"
    try:
        return STATS_SCHEMA in json.loads(meta.read_text()).get("attributes", {}).get(ATTRS_KEY, {}).get("kind", "")
    except (OSError, ValueError, AttributeError):
        return False


def create_stats(path: Path, attrs: dict[str, Any]) -> None:
    """A new statistics folder holding only its provenance (the sums come with the first checkpoint)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_attrs(group, {"kind": STATS_SCHEMA, "schema_version": STATS_VERSION, **attrs})


def read_stats_attrs(path: Path) -> dict[str, Any]:
    """The provenance of a statistics folder, refused in one line when it is not one or too new."""
    if not is_stats(path):
        raise DepthcacheError(f"{path} is not a layer-map statistics folder (made by depthcache map-stats)")
    attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"][ATTRS_KEY]
    major = str(attrs.get("schema_version", "")).split(".")[0]
    if major != STATS_VERSION.split(".")[0]:
        raise DepthcacheError(f"{path} is map-stats schema {attrs.get('schema_version')!r}; this depthcache reads "
                              f"{STATS_VERSION.split('.')[0]}.x")
    validator = jsonschema.Draft202012Validator(load_schema("map-stats.schema.json"))
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {error_message(e)}"
                for e in validator.iter_errors(attrs)]
    if problems:
        raise DepthcacheError(f"{path}: its attributes break the map-stats schema ({problems[0]}); copy or compute "
                              "them again")
    return attrs


def save_checkpoint(path: Path, stats: MapStats) -> None:
    """Replace the folder's sums with ``stats`` in one atomic publish (a kill leaves the previous checkpoint)."""
    ds = to_dataset(stats)
    write_dataset_atomically(ds, Path(path) / "sums", chunks=chunk_shapes(ds))


def save_curve_point(path: Path, m: Moments, shape: tuple[int, int, int, int]) -> None:
    """Write the training sums at a learning-curve point (idempotent: a resumed run writes the same bytes)."""
    ds = moments_dataset(m, *shape)
    write_dataset_atomically(ds, Path(path) / "curve" / f"{m.n:012d}", chunks=chunk_shapes(ds))


def chunk_shapes(ds: Any) -> dict[str, tuple[int, ...]]:
    """One chunk per source (or target) layer, 4,096 rows per chunk of the held-out rows: bounded objects."""
    return {name: tuple(1 if dim in ("source", "target") else max(1, min(4096, size)) if dim == "heldout"
                        else max(1, size) for dim, size in zip(var.dims, var.shape))
            for name, var in ds.data_vars.items() if {"source", "target"} & set(var.dims)}


def load_stats(path: Path, lazy_rows: bool = True, sources: slice = slice(None)) -> MapStats:
    """The latest checkpoint of a statistics folder (held-out rows lazily unless ``lazy_rows`` is False), only the
    source layers ``sources`` (a fit in groups of sources reads each group's sums alone)."""
    attrs = read_stats_attrs(path)
    if not (Path(path) / "sums").is_dir():
        raise DepthcacheError(f"{path} holds no sums yet: its run stopped before the first checkpoint; run it again "
                              "with --resume")
    try:
        ds = open_result(str(Path(path) / "sums"))
        attrs = attrs | {"shallow_layers": attrs.get("shallow_layers", [])[sources]}
        stats = MapStats(attrs, Shift(ds.shift_x[sources].values, ds.shift_y.values), moments_from(ds, sources),
                         ds.heldout_x[sources].data if lazy_rows else ds.heldout_x[sources].values,
                         ds.heldout_y.data if lazy_rows else ds.heldout_y.values,
                         ds.heldout_window.values, ds.heldout_split.values, json.loads(ds.attrs["progress"]))
    except DepthcacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or hostile folder may fail any codec in any way
        raise DepthcacheError(f"{path}: the statistics cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
                              "copy or compute them again") from exc
    check_consistent(stats, path)
    return stats


def check_consistent(stats: MapStats, path: Path) -> None:
    """Refuse statistics whose shapes disagree with each other or with the recorded layers, or that are not finite."""
    g, d, t, e = stats.shape
    m = stats.train
    expected = {"sx": (g, d), "gxx": (g, d, d), "sy": (t, e), "syy": (t,), "gxy": (g * d, t * e)}
    bad = [k for k, s in expected.items() if getattr(m, k).shape != s]
    bad += [] if stats.heldout_x.shape[::2] == (g, d) and stats.heldout_y.shape[::2] == (t, e) else ["heldout rows"]
    bad += [] if len(stats.attrs.get("shallow_layers", [])) == g and len(stats.attrs.get("deep_layers", [])) == t \
        else ["layer lists"]
    if bad:
        raise DepthcacheError(f"{path}: the statistics' shapes disagree ({', '.join(bad)}); copy or compute them again")
    if m.n < 0 or not all(np.isfinite(getattr(m, k)).all() for k in expected):
        raise DepthcacheError(f"{path}: the training sums hold a negative count or non-finite values")


def curve_folders(path: Path) -> list[Path]:
    """The learning-curve points of a statistics folder, by token count."""
    folder = Path(path) / "curve"
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def curve_point(folder: Path, sources: slice = slice(None)) -> Moments:
    """The training sums of the source layers ``sources`` at one learning-curve point."""
    try:
        return moments_from(open_result(str(folder)), sources)
    except Exception as exc:  # noqa: BLE001 - as in load_stats
        raise DepthcacheError(f"{folder}: a learning-curve point cannot be read ({exc})") from exc


def curve_points(path: Path, sources: slice = slice(None)) -> list[Moments]:
    """The training sums of the source layers ``sources`` at every learning-curve point of a statistics folder."""
    return [curve_point(folder, sources) for folder in curve_folders(path)]


# ------------------------------------------------------------------------------------------------------ merging

def identity(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes two statistics files must share to be merged."""
    return {k: attrs.get(k) for k in IDENTITY_KEYS}


def merge_stats(paths: Sequence[Path], out: Path) -> MapStats:
    """Sum the statistics of disjoint window ranges (workers, machines) into one folder ``out``: training sums and
    learning-curve points added (point k of each file), held-out rows joined in window order."""
    parts = [load_stats(p, lazy_rows=False) for p in paths]
    first = parts[0]
    for p, s in zip(paths[1:], parts[1:]):
        diffs = [k for k, v in identity(first.attrs).items() if identity(s.attrs)[k] != v]
        if diffs:
            raise DepthcacheError(f"{p} was computed with other {', '.join(diffs)} than {paths[0]}: only statistics of "
                                  "one model pair, data and split merge")
        if not (np.array_equal(s.shift.x, first.shift.x) and np.array_equal(s.shift.y, first.shift.y)):
            raise DepthcacheError(f"{p} uses another shift than {paths[0]}: they were not computed over the same data")
    ranges = sorted(r for s in parts for r in s.progress.get("ranges", []))
    if any(not s.progress.get("complete") for s in parts):
        raise DepthcacheError("merge only finished runs: " + ", ".join(str(p) for p, s in zip(paths, parts)
                                                                    if not s.progress.get("complete")) + " is not")
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise DepthcacheError(f"the window ranges {ranges} overlap: a token would be counted twice")
    train = parts[0].train
    for s in parts[1:]:
        train = train.plus(s.train)
    order = np.argsort(np.concatenate([s.heldout_window for s in parts]), kind="stable")
    merged = MapStats(first.attrs | {"merged_from": [str(p) for p in paths]}, first.shift, train,
                      np.concatenate([s.heldout_x for s in parts], axis=1)[:, order],
                      np.concatenate([s.heldout_y for s in parts], axis=1)[:, order],
                      np.concatenate([s.heldout_window for s in parts])[order],
                      np.concatenate([s.heldout_split for s in parts])[order],
                      {"ranges": ranges, "complete": True, "products": sum(s.progress.get("products", 0)
                                                                            for s in parts)})
    out = Path(out)
    if out.exists():
        raise DepthcacheError(f"{out} exists: merge into a new folder")
    create_stats(out, {k: v for k, v in merged.attrs.items() if k not in ("kind", "schema_version")})
    curves = [curve_points(p) for p in paths]
    for k in range(min(len(c) for c in curves)):
        point = curves[0][k]
        for c in curves[1:]:
            point = point.plus(c[k])
        save_curve_point(out, point, first.shape)
    save_checkpoint(out, merged)
    return merged


def remove_stats(path: Path) -> None:
    """Delete a statistics folder (a fresh, non-resumed run replaces it)."""
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ tokenizers

def tokenization_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """A tokenizer's files that decide how text becomes ids: all but the chat template (its own file, or the
    ``chat_template`` entry of tokenizer_config.json; Qwen2.5-Coder 0.5B and 1.5B differ by one escape there)."""
    files = {k: v for k, v in files.items() if k not in CHAT_TEMPLATE_FILES}
    if "tokenizer_config.json" in files:
        try:
            config = json.loads(files["tokenizer_config.json"])
        except ValueError:
            return files
        if isinstance(config, dict):
            config.pop("chat_template", None)
            files["tokenizer_config.json"] = json.dumps(config, sort_keys=True).encode()
    return files
