"""The shareable HTML report: one self-contained page with the provenance table and every cached analysis."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

from click.testing import CliRunner
from PIL import Image
from test_extract import run

from depthcache.analyze.registry import load_all
from depthcache.cli import main

ANALYSES = ("residual-norms", "logit-lens")


class Page(HTMLParser):
    """Collects images, section ids and table cells (by table class) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.sections: list[str] = []
        self.cells: dict[str, list[str]] = {}
        self.table: str | None = None
        self.in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        elif tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "table":
            self.table = a.get("class", "")
            self.cells.setdefault(self.table, [])
        self.in_cell = tag in ("td", "th") or (self.in_cell and tag not in ("tr", "table"))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.in_cell = False

    def handle_data(self, data: str) -> None:
        if self.in_cell and self.table is not None:
            self.cells[self.table].append(data)


def test_report_embeds_every_figure_and_the_provenance(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["llama"], text_file, dtype="bfloat16")
    for name in ANALYSES:
        assert CliRunner().invoke(main, ["analyze", name, str(store)]).exit_code == 0
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(store), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.strip() == str(out)
    page = Page()
    page.feed(out.read_text())
    assert page.sections == [f"analysis-{name}" for name in sorted(ANALYSES)]
    # every figure each analysis's plot function draws is embedded, as a decodable PNG
    expected = sum(len(load_all()[n].plot(xr_result(store, n), tmp_path)) for n in ANALYSES)
    assert len(page.images) == expected >= len(ANALYSES)
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1], validate=True)))
        png.verify()
        assert png.format == "PNG"
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]
    cells = page.cells["provenance"]
    for section in ("model", "data", "options", "layout", "progress", "versions"):
        assert section in cells
    for value in (attrs["model"]["spec"], attrs["dataset"]["sha256"], attrs["versions"]["zarr"], "bfloat16"):
        assert value in cells
    assert str(attrs["progress"]["tokens_committed"]) in cells
    assert "mean_norm" in page.cells["values"] and "kl_mean" in page.cells["values"]
    assert 'src="http' not in out.read_text() and "<link" not in out.read_text()  # self-contained


def xr_result(store, name):  # noqa: ANN001, ANN201 - small helper returning an xarray Dataset
    """A cached analysis result of the store."""
    from depthcache.store import results

    (entry,) = results.entries(results.Place(str(store), results.IN_STORE), name)
    return results.load(entry)


def test_report_escapes_untrusted_text(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["gpt2"], text_file)
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["depthcache"]["model"]["spec"] = "<script>alert(1)</script>"
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "r.html"
    assert CliRunner().invoke(main, ["report", str(store), "--out", str(out)]).exit_code == 0
    text = out.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "No analyses are cached" in text
