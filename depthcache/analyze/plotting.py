"""Figure helpers: one look for every depthcache plot (headless matplotlib, PNGs named after the analysis)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend, imported on first use: computing an analysis (which imports
    its module, and so this one) must not pay matplotlib's import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(ncols: int = 1, width: float = 5.5, height: float = 3.6) -> tuple[Figure, list]:
    """A figure with ``ncols`` side-by-side axes."""
    fig, axes = pyplot().subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save(fig: Figure, folder: Path, name: str) -> Path:
    """Save ``fig`` as folder/name.png and close it (legends placed outside the axes are kept in the image)."""
    path = folder / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    pyplot().close(fig)
    return path


def model_title(ds_attrs: dict, what: str) -> str:
    """'<what>' over '<exact model name(s)> — <store name(s)>' from a result's attrs (models joined by →)."""
    import json

    meta = json.loads(ds_attrs.get("depthcache_analysis", "{}"))
    where = ", ".join(Path(p).name for p in meta.get("source_locations", []))
    models = " → ".join(meta.get("models", []))
    return f"{what}\n{models} — {where}" if models else (f"{what} — {where}" if where else what)


def layer_axis(ax: Axes, axis: str = "x") -> None:
    """Integer ticks on a layer axis (a 4-layer model gets 0 1 2 3, not 0.5 steps)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def legend_outside(ax: Axes, below: bool = False, **kw: object) -> None:
    """A legend right of the axes (or below them, e.g. beside a colour bar), where it cannot cover data."""
    where = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "ncols": 2} if below else \
        {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
    ax.legend(borderaxespad=0.0, fontsize=7, **where, **kw)


def band_floor(*means: np.ndarray) -> float:
    """The lower edge of a log axis showing mean ± std bands: half the smallest positive mean."""
    values = np.concatenate([np.ravel(np.asarray(m, dtype=np.float64)) for m in means])
    positive = values[np.isfinite(values) & (values > 0)]
    return 0.5 * float(positive.min()) if positive.size else 1e-12


def band_edges(mean: np.ndarray, std: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """(lower, upper, clipped) edges of a mean ± std band on a log axis starting at ``floor``: where mean − std is
    below it (or ≤ 0, which a log axis cannot show) the band runs to the axis edge instead of vanishing."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    lower = mean - std
    return np.maximum(lower, floor), mean + std, bool((lower[np.isfinite(lower)] < floor).any())


def interval_band(ax: Axes, result: Any, name: str, color: str, x: np.ndarray | None = None, **sel: Any) -> None:
    """Shade ``result[name + '_lo']`` to ``result[name + '_hi']`` (a bootstrap interval) where the result has it."""
    if f"{name}_lo" not in result:
        return
    lo, hi = (result[f"{name}_{end}"].sel(**sel) if sel else result[f"{name}_{end}"] for end in ("lo", "hi"))
    x = lo[lo.dims[0]].values if x is None else x
    ax.fill_between(x, lo.values, hi.values, alpha=0.2, color=color, lw=0)


def band_note(result: Any) -> str:
    """', bands: 95 % CI over N windows' from a result's ``ci`` attribute ('' without one)."""
    ci = str(result.attrs.get("ci", ""))
    if not ci or ci.startswith("none"):
        return ""
    level, windows = float(ci.split()[0]), ci.split(" over ")[1].split(",")[0]
    return f", bands: {level * 100:g} % CI over {windows}"
