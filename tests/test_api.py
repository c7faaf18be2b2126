"""The Python API: docs/api.md's examples run; depthcache.extract takes model objects and Python data; the reader's
coordinates, token text, float32 view, TransformerLens names and open_datatree."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers
import xarray as xr
import zarr
from conftest import save_tiny_model

import depthcache
from depthcache.errors import DepthcacheError
from depthcache.store.head import load_tokenizer
from depthcache.store.hooks import hook_name, parse_hook

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
TEXTS = ["The quick brown fox jumps over the lazy dog. Residual streams carry information from layer to layer.",
         "Numbers: 0 1 2 3 4 5 6 7 8 9 + - = ( ) and some punctuation, too!",
         "Language models use their depth in interesting ways; some layers matter more."]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-style model folder (BOS-prepending tokenizer)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("api-model") / "llama")


@pytest.fixture(scope="module")
def store(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small store of TEXTS extracted from the model object (float32, so comparisons are exact)."""
    out = tmp_path_factory.mktemp("api-store") / "s.zarr"
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    depthcache.extract(model, TEXTS * 3, tokenizer=tokenizer, out=out, dtype="float32", seq_len=24, chunk_tokens=32,
                       device="cpu")
    return out


def python_blocks(markdown: str) -> list[str]:
    """The ```python code blocks of a Markdown file, in order."""
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_docs_api_examples_run(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    namespace: dict = {}
    for block in blocks:
        code = re.sub(r'^MODEL = ".*"', f"MODEL = {str(llama)!r}", block, flags=re.M)
        exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 - the documentation's own examples
    assert (tmp_path / "probe-accuracy.png").stat().st_size > 1000
    accuracy = namespace["accuracy"]
    assert accuracy.shape == (4,) and np.all((accuracy >= 0) & (accuracy <= 1))
    assert namespace["items"][0]["answer"] == " 7" and namespace["items"][1]["answer"] == " 12"


def test_model_object_gives_the_same_store_as_its_folder(llama: Path, store: Path, tmp_path: Path) -> None:
    by_spec = depthcache.extract(str(llama), TEXTS * 3, out=tmp_path / "spec.zarr", dtype="float32", seq_len=24,
                                 chunk_tokens=32, device="cpu")
    by_object = depthcache.open(store)
    for name in ("resid_pre", "attn_out", "mlp_out", "resid_final", "token_id", "position"):
        np.testing.assert_array_equal(by_object[name].values, by_spec[name].values)
    model_attrs = by_object.attrs["depthcache"]["model"]
    assert model_attrs["source"] == "memory" and model_attrs["spec"] == str(llama)
    assert re.fullmatch(r"[0-9a-f]{64}", model_attrs["weights_sha256"])
    assert by_object.attrs["depthcache"]["dataset"]["n_documents"] == len(TEXTS) * 3


def test_extract_refuses_unclear_inputs(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(DepthcacheError, match="pass a list of strings"):
        depthcache.extract(str(llama), "Just one sentence of text.", out=tmp_path / "x.zarr")
    with pytest.raises(DepthcacheError, match="unknown option"):
        depthcache.extract(str(llama), TEXTS, out=tmp_path / "x.zarr", seq_length=16)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    with pytest.raises(DepthcacheError, match="needs its tokenizer"):
        depthcache.extract(model, TEXTS, out=tmp_path / "x.zarr")
    with pytest.raises(DepthcacheError, match="is on cpu"):
        depthcache.extract(model, TEXTS, tokenizer=object, out=tmp_path / "x.zarr", device="cuda")
    assert not (tmp_path / "x.zarr").exists()


def test_coordinates_group_and_token_text_decodes_each_token(llama: Path, store: Path) -> None:
    ds = depthcache.open(store, token_text=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    ids, nxt = ds.token_id.values, ds.next_token_id.values
    assert list(ds.token_text.values) == [tokenizer.decode([int(i)]) for i in ids]
    assert list(ds.next_token_text.values) == [tokenizer.decode([int(i)]) if i >= 0 else "" for i in nxt]
    assert ds.token_text.values[0] == "<s>"
    # groupby on the (loaded) coordinates, checked against numpy
    mean = ds.resid_pre.sel(layer=1).groupby("position").mean().values
    h, pos = ds.resid_pre.sel(layer=1).values, ds.position.values
    np.testing.assert_allclose(mean, np.stack([h[pos == p].mean(0) for p in np.unique(pos)]), rtol=1e-6, atol=1e-6)
    lazy = depthcache.open(store, load_coords=False)
    assert lazy.position.chunks is not None and ds.position.chunks is None


def test_float32_view_makes_bf16_arithmetic_work(llama: Path, tmp_path: Path) -> None:
    ds = depthcache.extract(str(llama), TEXTS, out=tmp_path / "bf16.zarr", seq_len=24, device="cpu")
    assert ds.resid_pre.dtype.name == "bfloat16"
    with pytest.raises(TypeError):
        (ds.resid_pre ** 2).sum("d_model").compute()
    f = ds.depthcache.float32()
    assert f.resid_pre.dtype == np.float32 and f.token_id.dtype == np.int32
    expected = (ds.resid_pre.values.astype(np.float64) ** 2).sum(-1)
    np.testing.assert_allclose((f.resid_pre ** 2).sum("d_model").values, expected, rtol=1e-5)
    assert depthcache.open(tmp_path / "bf16.zarr", float32=True).resid_pre.dtype == np.float32


def test_transformer_lens_names_select_the_stored_arrays(store: Path) -> None:
    ds = depthcache.open(store)
    names = ds.depthcache.hook_names()
    assert names[:4] == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out",
                         "blocks.0.hook_resid_post"]
    assert names[-1] == "ln_final.hook_normalized" and len(names) == 4 * 4 + 1
    np.testing.assert_array_equal(ds.depthcache.hook("blocks.2.hook_mlp_out").values, ds.mlp_out.sel(layer=2).values)
    np.testing.assert_array_equal(ds.depthcache.hook("blocks.1.hook_resid_post").values,
                                  ds.resid_pre.sel(layer=2).values)
    np.testing.assert_array_equal(ds.depthcache.hook("blocks.3.hook_resid_post").values, ds.resid_final.values)
    # the final norm without its weight, against float64 numpy (Llama: RMSNorm)
    x = ds.resid_final.values.astype(np.float64)
    eps = zarr.open_group(str(store), mode="r")["model"].attrs["final_norm"]["eps"]
    np.testing.assert_allclose(ds.depthcache.hook("ln_final.hook_normalized").values,
                               x / np.sqrt((x * x).mean(-1, keepdims=True) + eps), rtol=1e-5, atol=1e-6)
    assert hook_name("attn_out", 3) == "blocks.3.hook_attn_out" and parse_hook("blocks.3.hook_attn_out") == (
        "hook_attn_out", 3)
    for bad in ("blocks.9.hook_resid_pre", "blocks.1.hook_q", "embed"):
        with pytest.raises(DepthcacheError):
            ds.depthcache.hook(bad)
    partial = depthcache.open(store).sel(layer=[0, 1])
    with pytest.raises(DepthcacheError, match="layer 2"):
        partial.depthcache.hook("blocks.1.hook_resid_post")


def test_open_datatree_reads_every_group(store: Path, tmp_path: Path) -> None:
    from depthcache.analyze import run

    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    lens = run("logit-lens", str(copy))  # its layer axis has one entry more than the store's (the final layer)
    assert lens.sizes["layer"] == 5
    tree = xr.open_datatree(copy, engine="zarr", consolidated=False)
    assert {"/", "/model", "/model/tokenizer", "/analyses/logit-lens"} <= set(tree.groups)
    files = tree["model/tokenizer"].to_dataset()
    assert len({files[name].dims[0] for name in files.data_vars}) == len(files.data_vars)
    (entry,) = tree["analyses/logit-lens"].children.values()  # analyses/<name>/<key of the parameters>
    assert entry.sizes["result_layer"] == 5 and "layer" not in entry.to_dataset(inherit=False).dims
    cached = run("logit-lens", str(copy))  # read back from the cache under its own dimension names
    assert cached.sizes["layer"] == 5 and "result_layer" not in cached.dims
    xr.testing.assert_allclose(cached.drop_attrs(), lens.drop_attrs())


def test_stores_with_one_shared_byte_dimension_still_open(llama: Path, store: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    for meta in (old / "model" / "tokenizer").glob("*/zarr.json"):  # as schema <= 1.2 wrote them
        content = json.loads(meta.read_text())
        content["dimension_names"] = ["byte"]
        meta.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="byte"):
        xr.open_datatree(old, engine="zarr", consolidated=False)
    ds = depthcache.open(old, token_text=True)
    assert ds.token_text.values[0] == "<s>"
    assert load_tokenizer(str(old)).decode([5]) == transformers.AutoTokenizer.from_pretrained(llama).decode([5])
