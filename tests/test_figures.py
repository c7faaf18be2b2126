"""Analysis figures: legends beside the data, ± std bands that survive a log axis, heatmap colour scales that say
what they cut, integer layer ticks on small models. Built from small constructed results (no store needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure

from depthcache.analyze import contributions, plotting, residual_norms, skip_effects

N_LAYERS = 4


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    """The figures the plot functions save, kept open for inspection."""
    kept: list[Figure] = []

    def keep(fig: Figure, folder: Path, name: str) -> Path:
        fig.canvas.draw()
        kept.append(fig)
        return folder / f"{name}.png"

    monkeypatch.setattr(plotting, "save", keep)
    return kept


def attrs() -> dict:
    """What a cached result carries for figure titles."""
    return {"depthcache_analysis": json.dumps({"source_locations": ["s.zarr"]}), "n_layers": N_LAYERS,
            "include_first": 0}


def norms_result() -> xr.Dataset:
    """residual-norms with a std larger than the mean at layer 1 (mean − std < 0)."""
    layers = np.arange(N_LAYERS + 1)
    return xr.Dataset({"mean_norm": ("layer", [1.0, 2.0, 4.0, 8.0, 16.0]), "std_norm": ("layer", [0.1, 3.0, 1, 1, 1]),
                       "max_norm": ("layer", [2.0, 9.0, 9.0, 12.0, 30.0])},
                      coords={"layer": layers, "relative_depth": ("layer", layers / N_LAYERS)}, attrs=attrs())


def overlaps(a, b) -> bool:  # noqa: ANN001 - matplotlib Bbox
    """Whether two display-space boxes intersect."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_band_edges_clip_at_the_floor_instead_of_vanishing():
    lower, upper, clipped = plotting.band_edges(np.array([1.0, 2.0]), np.array([0.5, 3.0]), 0.25)
    np.testing.assert_array_equal(lower, [0.5, 0.25])
    np.testing.assert_array_equal(upper, [1.5, 5.0])
    assert clipped and not plotting.band_edges(np.array([1.0]), np.array([0.1]), 0.25)[2]
    assert plotting.band_floor(np.array([0.0, 0.4, 3.0])) == 0.2


def test_norm_band_survives_the_log_axis_and_the_legend_is_beside_it(figures, tmp_path):
    residual_norms.plot(norms_result(), tmp_path)
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(0.5)
    (band,) = ax.collections
    vertices = band.get_paths()[0].vertices
    assert np.isfinite(vertices).all() and vertices[:, 1].min() == pytest.approx(0.5)  # cut at the axis, not gone
    legend = ax.get_legend()
    assert "cut at the axis" in [t.get_text() for t in legend.get_texts()][1]
    renderer = fig.canvas.get_renderer()
    assert not overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def test_contributions_ticks_are_whole_layers(figures, tmp_path):
    layers, subs, buckets = np.arange(N_LAYERS), np.array(contributions.SUBLAYERS, dtype=object), ["1", "2-3"]
    rng = np.random.default_rng(0)
    shape = (3, N_LAYERS)
    result = xr.Dataset({"rel_mean": (("sublayer", "layer"), rng.uniform(0.1, 1, shape)),
                         "rel_std": (("sublayer", "layer"), rng.uniform(0.05, 2, shape)),
                         "cos_mean": (("sublayer", "layer"), rng.uniform(-1, 1, shape)),
                         "rel_mean_by_position": (("sublayer", "layer", "position_bucket"),
                                                  rng.uniform(0.1, 1, (*shape, 2))),
                         "tokens_used": ((), 100)},
                        coords={"sublayer": subs, "layer": layers, "position_bucket": buckets}, attrs=attrs())
    contributions.plot(result, tmp_path)
    for ax in figures[0].axes[:2] + figures[1].axes[:1]:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    rel = figures[0].axes[0]
    assert rel.get_ylim()[0] == pytest.approx(plotting.band_floor(result.rel_mean.values))
    assert "cut at the axis" in rel.get_title()  # some std exceeds its mean


def test_skip_heatmap_colour_bar_says_what_is_cut(figures, tmp_path):
    effect = np.array([[0.0, 0.5, 3.0, 0.2], [0.0, 0.0, 0.9, 1.5], [0.0, 0.0, 0.0, 0.3]])
    skipped = np.array([0, 1, 2])
    zeros = ("skipped_layer", np.zeros(3))
    result = xr.Dataset({"max_effect": (("skipped_layer", "layer"), effect),
                         "mean_effect": (("skipped_layer", "layer"), effect / 10), "output_l2_max": zeros,
                         "output_l2_mean": zeros},
                        coords={"skipped_layer": skipped, "layer": np.arange(N_LAYERS)},
                        attrs=attrs() | {"variant": "current", "sublayer": "layer", "tokens": 64})
    skip_effects.plot(result, tmp_path)
    top, mean = figures
    bar = top.axes[-1]
    assert "2 of 12 cells are above" in bar.get_ylabel() and "max 3" in bar.get_ylabel()
    assert top.axes[0].images[0].colorbar.extend == "max"  # the triangle: values beyond the scale
    assert "every cell ≤ 1" in mean.axes[-1].get_ylabel() and mean.axes[0].images[0].colorbar.extend == "neither"
