"""A shareable, self-contained HTML report of a store: provenance and every cached analysis result with its figures.

Everything read from the store is untrusted and HTML-escaped; figures are drawn by the analyses' own plot
functions and embedded as base64 PNGs, so the page is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from depthcache.analyze.registry import load_all
from depthcache.errors import DepthcacheError
from depthcache.store import results
from depthcache.store.io import model_display_name, parse_json
from depthcache.store.reader import Store
from depthcache.store.results import RESULT_ATTR

MAX_CELL = 2000  # characters of one table cell (store values are untrusted and may be huge)

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top;font-size:0.9em}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
code{font-size:0.9em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em}"""


def esc(value: Any, limit: int = MAX_CELL) -> str:
    """Any value as escaped HTML text (store contents are untrusted), cut to ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit:,} more characters)"
    return html.escape(text)


def table(rows: Iterable[tuple[Any, ...]], header: tuple[str, ...] | None = None, css: str = "") -> str:
    """An HTML table of escaped cells."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}">{head}{body}</table>'


def provenance_rows(attrs: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(section, field, value) for the model, data, options, layout, progress and versions of a store."""
    model = {k: v for k, v in attrs["model"].items() if k != "config"}
    rows = [("store", "schema_version", attrs["schema_version"]), ("store", "created", attrs["created"])]
    for section, values in (("model", model), ("data", attrs["dataset"]), ("options", attrs["options"]),
                            ("layout", attrs["layout"]), ("progress", attrs["progress"]),
                            ("versions", attrs["versions"])):
        rows += [(section, key, value) for key, value in values.items()]
    return rows


def value_rows(result: xr.Dataset) -> list[tuple[str, str, str, str, str, str]]:
    """(variable, dims, shape, min, mean, max) of every data variable: the key values at a glance."""
    rows = []
    for name, var in result.data_vars.items():
        values = np.asarray(var.values)
        finite = values[np.isfinite(values)] if values.dtype.kind in "fc" else values.ravel()
        stats = (("-", "-", "-") if finite.size == 0 or values.dtype.kind not in "biuf" else
                 tuple(f"{x:.4g}" for x in (finite.min(), finite.astype(np.float64).mean(), finite.max())))
        rows.append((str(name), ", ".join(map(str, var.dims)), str(tuple(var.shape)), *stats))
    return rows


def cached_entries(store: Store, results_dir: str | None = None) -> dict[str, results.Entry]:
    """The current cached result of every analysis of ``store`` by label (several parameter sets: 'NAME (KEY=VALUE,
    ...)'), not loaded yet: the report loads one at a time."""
    current = [e for e in results.all_entries(store, results_dir) if results.belongs(e, store)]
    counts = Counter(e.name for e in current)
    return {(entry.name if counts[entry.name] == 1 else f"{entry.name} ({results.params_text(entry.params)})"): entry
            for entry in current}


def loaded(entry: results.Entry) -> xr.Dataset:
    """One cached result in memory (bounded, checksummed), or an error saying to recompute it."""
    try:
        return results.read(entry)
    except DepthcacheError as exc:
        raise DepthcacheError(f"cached analysis {entry.name!r} is unreadable, implausibly large, not checksummed or "
                              f"corrupt ({exc}); recompute it with depthcache analyze {entry.name} STORE --force"
                              ) from exc


def figures(name: str, result: xr.Dataset) -> list[str]:
    """The analysis's figures as base64 PNG strings (none if it has no plot or is unknown here)."""
    spec = load_all().get(analysis_name(name))
    if spec is None or spec.plot is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = spec.plot(result, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - a cached result is untrusted: junk in it fails plotting anyhow
            raise DepthcacheError(f"cached analysis {name!r} is not a {analysis_name(name)} result this version can "
                                  f"draw ({type(exc).__name__}: {str(exc)[:200]}); recompute it with depthcache "
                                  f"analyze {analysis_name(name)} STORE --force") from exc
        return [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]


def analysis_name(label: str) -> str:
    """The analysis of a report section label ('logit-lens (max_tokens=2048)' → 'logit-lens')."""
    return label.split(" (", 1)[0]


def analysis_section(name: str, result: xr.Dataset) -> str:
    """One analysis: its parameters, figures and key values."""
    try:
        meta = parse_json(result.attrs.get(RESULT_ATTR, "{}"), f"the provenance of cached analysis {name!r}")
    except (DepthcacheError, TypeError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    spec = load_all().get(analysis_name(name))
    parts = [f'<section class="analysis" id="analysis-{esc(name)}"><h2>{esc(name)}</h2>',
             f"<p>{esc(spec.summary if spec else 'analysis unknown to this depthcache version')}</p>",
             table([("parameters", meta.get("params", {})), ("computed", meta.get("created", "?")),
                    ("code version", meta.get("code_version", "?"))])]
    parts += [f'<img alt="{esc(name)} figure {i + 1}" src="data:image/png;base64,{png}">'
              for i, png in enumerate(figures(name, result))]
    parts += [table(value_rows(result), ("variable", "dims", "shape", "min", "mean", "max"), "values"), "</section>"]
    return "\n".join(parts)


def build_report(location: str, storage_options: Mapping[str, Any] | None = None,
                 results_dir: str | None = None) -> str:
    """The whole HTML page for the store at ``location``."""
    store = Store(location, dict(storage_options or {}))
    attrs = store.attrs
    found = cached_entries(store, results_dir)
    title = f"depthcache report — {model_display_name(attrs['model'])} on {attrs['dataset']['name']}"
    body = [f"<h1>{esc(title)}</h1>", f"<p>Store <code>{esc(location)}</code>; runs: "
            f"{esc(', '.join(store.runs()) or '(none)')}; analyses: {esc(', '.join(found) or '(none)')}.</p>",
            "<h2>Provenance</h2>", table(provenance_rows(attrs), ("section", "field", "value"), "provenance")]
    body += [analysis_section(name, loaded(entry)) for name, entry in found.items()]  # one result in memory at a time
    if not found:
        body.append("<p>No analyses are cached for this store yet: run <code>depthcache analyze NAME STORE</code>."
                    "</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(location: str, out: str, storage_options: Mapping[str, Any] | None = None,
                 results_dir: str | None = None) -> Path:
    """Write the report of ``location`` (with the results cached in ``results_dir`` too) to ``out``."""
    path = Path(out)
    page = build_report(location, storage_options, results_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise DepthcacheError(f"cannot write the report to {out}: {exc.strerror or exc}; pass --out FILE in a "
                              "writable folder") from exc
    return path
