"""Models are named exactly (weights, quantization) wherever a store is described, and stores record where the
dequantized weights came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner
from test_extract import run
from test_models import fake_gguf_loaders, write_gguf

from depthcache.analyze import run as run_analysis
from depthcache.analyze.plotting import model_title
from depthcache.cli import MODEL_HELP, main
from depthcache.model.loading import ALIASES
from depthcache.store.io import model_display_name
from depthcache.store.schema import validate_store

NAME = "Tiny Llama 2L (Q4_1 GGUF, dequantized)"


@pytest.fixture
def gguf_store(tiny_models, text_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store extracted from a (metadata-only) GGUF whose dequantization yields the tiny Llama."""
    folder = tiny_models["llama"]
    tiny = (folder, transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
            transformers.AutoTokenizer.from_pretrained(folder))
    fake_gguf_loaders(monkeypatch, tiny, [])
    monkeypatch.setenv("DEPTHCACHE_CACHE", str(tmp_path / "cache"))
    return run(tmp_path, write_gguf(tmp_path / "weights.gguf"), text_file)


def store_attrs(store: Path) -> dict:
    """The store's depthcache attributes, read straight from its zarr.json."""
    return json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]


def test_store_records_the_quantization_it_was_dequantized_from(gguf_store: Path, tmp_path: Path) -> None:
    model = store_attrs(gguf_store)["model"]
    sha256 = hashlib.sha256((tmp_path / "weights.gguf").read_bytes()).hexdigest()
    assert model["display_name"] == NAME
    assert model["quantization"] == {"format": "gguf", "type": "Q4_1", "tensor_types": {"F16": 2, "F32": 1},
                                     "gguf_general_name": "Tiny Llama 2L", "source_file": "weights.gguf",
                                     "source_sha256": sha256, "dequantized_to": "float32"}
    assert model["weights_sha256"] == sha256
    assert validate_store(str(gguf_store)) == []


def test_info_names_the_model_and_its_quantization(gguf_store: Path) -> None:
    out = CliRunner().invoke(main, ["info", str(gguf_store)], catch_exceptions=False).output
    assert f"model      {NAME}\n" in out
    assert "Q4_1 GGUF weights.gguf (tensors F16 2, F32 1), dequantized to float32" in out


def test_figure_titles_name_the_model(gguf_store: Path) -> None:
    result = run_analysis("residual-norms", str(gguf_store))
    assert model_title(result.attrs, "Residual stream norm") == f"Residual stream norm\n{NAME} — s.zarr"


def test_unquantized_store_is_named_by_its_folder(tiny_models, text_file, tmp_path: Path) -> None:
    model = store_attrs(run(tmp_path, tiny_models["qwen2"], text_file))["model"]
    assert model["display_name"] == tiny_models["qwen2"].name
    assert model["quantization"] is None


@pytest.mark.parametrize(("model", "expected"), [
    ({"display_name": NAME, "alias": "x", "spec": "x", "source": "gguf"}, NAME),
    ({"alias": "smollm2-135m", "spec": "smollm2-135m", "source": "gguf"}, "smollm2-135m (GGUF, dequantized)"),
    ({"alias": None, "spec": "/models/tiny-llama/", "source": "local"}, "tiny-llama"),
    ({"alias": None, "spec": "org/model", "source": "hub", "display_name": None}, "model"),
])
def test_display_name_of_stores_with_and_without_a_recorded_name(model: dict, expected: str) -> None:
    assert model_display_name(model) == expected


def test_schema_refuses_a_malformed_quantization_record(gguf_store: Path) -> None:
    meta_path = gguf_store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["depthcache"]["model"]["quantization"]["source_sha256"] = "not a hash"
    meta_path.write_text(json.dumps(meta))
    assert any("quantization.source_sha256" in problem for problem in validate_store(str(gguf_store)))


def test_model_help_lists_every_alias() -> None:
    assert all(alias in MODEL_HELP for alias in ALIASES)
