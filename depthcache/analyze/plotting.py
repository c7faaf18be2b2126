"""Figure helpers: one look for every depthcache plot (headless matplotlib, PNGs named after the analysis)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def figure(ncols: int = 1, width: float = 5.5, height: float = 3.6) -> tuple[Figure, list]:
    """A figure with ``ncols`` side-by-side axes."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save(fig: Figure, folder: Path, name: str) -> Path:
    """Save ``fig`` as folder/name.png and close it."""
    path = folder / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def model_title(ds_attrs: dict, what: str) -> str:
    """'<what>' over '<exact model name(s)> — <store name(s)>' from a result's attrs (models joined by →)."""
    import json

    meta = json.loads(ds_attrs.get("depthcache_analysis", "{}"))
    where = ", ".join(Path(p).name for p in meta.get("source_locations", []))
    models = " → ".join(meta.get("models", []))
    return f"{what}\n{models} — {where}" if models else (f"{what} — {where}" if where else what)
