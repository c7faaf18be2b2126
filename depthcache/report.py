"""A shareable, self-contained HTML report of a store: provenance and every cached analysis with its figures.

Everything read from the store is untrusted and HTML-escaped; figures are drawn by the analyses' own plot
functions and embedded as base64 PNGs, so the page is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from depthcache.analyze.registry import load_all
from depthcache.analyze.runner import MAX_RESULT_BYTES, RESULT_ATTR
from depthcache.errors import DepthcacheError
from depthcache.store.io import open_result
from depthcache.store.reader import Store

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top;font-size:0.9em}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
code{font-size:0.9em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em}"""


def esc(value: Any) -> str:
    """Any value as escaped HTML text (store contents are untrusted)."""
    return html.escape(value if isinstance(value, str) else json.dumps(value, default=str))


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


def cached_results(store: Store) -> dict[str, xr.Dataset]:
    """Every analysis result cached under ``analyses/<name>`` in the store, loaded (size-checked first)."""
    group = store.group
    names = sorted(group["analyses"].group_keys()) if "analyses" in group.group_keys() else []
    results = {}
    for name in names:
        try:
            ds = open_result(group.store, f"analyses/{name}")
        except Exception as exc:  # noqa: BLE001 - a damaged cached result is reported, not fatal
            raise DepthcacheError(f"cached analysis {name!r} in {store.location} is unreadable ({exc}); "
                                  f"recompute it with depthcache analyze {name} --force") from exc
        if ds.nbytes > MAX_RESULT_BYTES:
            raise DepthcacheError(f"cached analysis {name!r} in {store.location} is implausibly large")
        results[name] = ds.load()
    return results


def figures(name: str, result: xr.Dataset) -> list[str]:
    """The analysis's figures as base64 PNG strings (none if it has no plot or is unknown here)."""
    spec = load_all().get(name)
    if spec is None or spec.plot is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        return [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in spec.plot(result, Path(tmp))]


def analysis_section(name: str, result: xr.Dataset) -> str:
    """One analysis: its parameters, figures and key values."""
    try:
        meta = json.loads(result.attrs.get(RESULT_ATTR, "{}"))
    except (ValueError, TypeError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    spec = load_all().get(name)
    parts = [f'<section class="analysis" id="analysis-{esc(name)}"><h2>{esc(name)}</h2>',
             f"<p>{esc(spec.summary if spec else 'analysis unknown to this depthcache version')}</p>",
             table([("parameters", meta.get("params", {})), ("computed", meta.get("created", "?")),
                    ("code version", meta.get("code_version", "?"))])]
    parts += [f'<img alt="{esc(name)} figure {i + 1}" src="data:image/png;base64,{png}">'
              for i, png in enumerate(figures(name, result))]
    parts += [table(value_rows(result), ("variable", "dims", "shape", "min", "mean", "max"), "values"), "</section>"]
    return "\n".join(parts)


def build_report(location: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The whole HTML page for the store at ``location``."""
    store = Store(location, dict(storage_options or {}))
    attrs = store.attrs
    results = cached_results(store)
    title = f"depthcache report — {attrs['model']['spec']} on {attrs['dataset']['name']}"
    body = [f"<h1>{esc(title)}</h1>", f"<p>Store <code>{esc(location)}</code>; runs: "
            f"{esc(', '.join(store.runs()) or '(none)')}; analyses: {esc(', '.join(results) or '(none)')}.</p>",
            "<h2>Provenance</h2>", table(provenance_rows(attrs), ("section", "field", "value"), "provenance")]
    body += [analysis_section(name, result) for name, result in results.items()]
    if not results:
        body.append("<p>No analyses are cached in this store yet: run <code>depthcache analyze NAME STORE</code>.</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(location: str, out: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """Write the report of ``location`` to the file ``out``; returns its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(location, storage_options), encoding="utf-8")
    return path
