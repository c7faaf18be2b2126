"""layer-map against scikit-learn's Ridge and a direct numpy computation; token checks; the pruned-copy tool."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import transformers
import zarr
from click.testing import CliRunner
from conftest import write_documents
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from depthcache.analyze import layer_map as lm
from depthcache.analyze import run
from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.model_group import _array as model_array
from depthcache.model.pruned import prune_copy
from depthcache.store.head import tokenizer_files, tokenizer_sha256
from depthcache.store.io import read_attrs, write_attrs
from depthcache.store.reader import Store, open_dataset

EXACT = 1e-6  # relative tolerance of the float64 path against scikit-learn (float32 store data)


def synthetic(seed: int = 0, n: int = 900) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 sources (2, n, 6) with a large common offset, targets (3, n, 4) nonlinear in a shared latent, split."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    x = np.stack([z @ rng.normal(size=(5, 6)) + 0.3 * rng.normal(size=(n, 6)) + 50 for _ in range(2)])
    y = np.stack([np.tanh(z @ rng.normal(size=(5, 4))) + 0.1 * rng.normal(size=(n, 4)) - 20 for _ in range(3)])
    split = lm.split_tokens(np.arange(n) // 30, np.arange(n) % 30, 0.15, 0.15, include_first=False)
    return x.astype(np.float32), y.astype(np.float32), split


def solved(x: np.ndarray, y: np.ndarray, split: np.ndarray, select: str,
           grid: tuple[float, ...] = lm.DEFAULT_GRID) -> tuple[list[lm.SourceFit], lm.Shift]:
    """Statistics from dask arrays (float64 products, small product groups so many are formed) and solve."""
    xd, yd = da.from_array(x, chunks=(x.shape[0], 100, x.shape[2])), da.from_array(y, chunks=(y.shape[0], 100, 4))
    stats, _ = lm.store_statistics(xd, yd, split, np.arange(x.shape[1]) // 30, False, np.dtype("float64"), 64)
    val = lm.validation_sums(stats, 64, np.dtype("float64"))
    grid = np.asarray(grid)
    return [lm.solve_source(stats.train, val, i, grid, select) for i in range(x.shape[0])], stats.shift


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """1 − SSE/SST over all dimensions (SST about y's own mean)."""
    return float(r2_score(y, pred, multioutput="variance_weighted"))


def coefficients(fit: lm.SourceFit, shift: lm.Shift, i: int, penalty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W (t, d, e), intercept (t, e)) of a fit in the stores' original coordinates: ŷ = x W + b (scikit-learn's)."""
    w = fit.weights(penalty)
    return w, fit.mean_y + shift.y - np.einsum("d,tde->te", fit.mean_x + shift.x[i], w)


def test_coefficients_and_validation_scores_match_sklearn() -> None:
    x, y, split = synthetic()
    fits, shift = solved(x, y, split, "pair")
    train, val = split == lm.TRAIN, split == lm.VAL
    for i, fit in enumerate(fits):
        for a, alpha in enumerate(fit.penalties):
            w, b = coefficients(fit, shift, i, np.full(3, a))
            for j in range(3):
                ref = Ridge(alpha=alpha, fit_intercept=True).fit(x[i][train].astype(np.float64), y[j][train])
                np.testing.assert_allclose(w[j], ref.coef_.T, rtol=EXACT, atol=EXACT * np.abs(ref.coef_).max())
                np.testing.assert_allclose(b[j], ref.intercept_, rtol=EXACT)
                expected = r2(y[j][val], ref.predict(x[i][val].astype(np.float64)))
                assert fit.val_r2[j, a] == pytest.approx(expected, rel=EXACT)


@pytest.mark.parametrize("select", ["source", "pair"])
def test_penalty_selection_matches_brute_force(select: str) -> None:
    x, y, split = synthetic(seed=1, n=600)
    fits, _ = solved(x, y, split, select, grid=(1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0))  # coarse: no near-ties
    train, val = split == lm.TRAIN, split == lm.VAL
    x64 = x.astype(np.float64)
    for i, fit in enumerate(fits):
        scores = np.array([[r2(y[j][val], Ridge(alpha=alpha).fit(x64[i][train], y[j][train]).predict(x64[i][val]))
                            for alpha in fit.penalties] for j in range(3)])
        expected = np.argmax(scores, axis=1) if select == "pair" else np.full(3, np.argmax(scores.mean(axis=0)))
        np.testing.assert_array_equal(fit.chosen, expected)
    if select == "pair":  # the synthetic targets differ enough that a per-pair choice is not constant
        assert len({int(c) for f in fits for c in f.chosen}) > 1


def test_split_is_whole_windows_by_hash() -> None:
    seq = np.repeat(np.arange(40), 8)
    split = lm.split_tokens(seq, np.tile(np.arange(8), 40), 0.2, 0.1, include_first=True)
    for s in range(40):
        assert len(set(split[seq == s])) == 1
    assert [(split == k).sum() // 8 for k in (lm.TRAIN, lm.VAL, lm.TEST)] == [28, 8, 4]
    no_first = lm.split_tokens(seq, np.tile(np.arange(8), 40), 0.2, 0.1, include_first=False)
    assert (no_first[::8] == lm.EXCLUDED).all() and (no_first[1::8] == split[1::8]).all()
    with pytest.raises(DepthcacheError, match="at least 3"):
        lm.split_tokens(np.array([0, 0, 1]), np.array([0, 1, 0]), 0.2, 0.2, include_first=True)


# ---------------------------------------------------------------------------------------- stores of tiny models

@pytest.fixture(scope="module")
def stores(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 stores of the tiny Llama ('deep', 4 layers) and its every-other pruned copy ('shallow', 2 layers)."""
    root = tmp_path_factory.mktemp("layermap")
    data = root / "docs.jsonl"
    write_documents(data, [2 + i % 3 for i in range(12)])
    result = CliRunner().invoke(main, ["prune-copy", "--model", str(tiny_models["llama"]), "--out",
                                       str(root / "pruned")])
    assert result.exit_code == 0, result.output
    out = {}
    for name, model, max_tokens in (("deep", tiny_models["llama"], None), ("shallow", root / "pruned", None),
                                    ("short", tiny_models["llama"], 200)):
        opts = ExtractOptions(out=str(root / f"{name}.zarr"), model=str(model), data=str(data), sites=("resid",),
                              dtype="float32", seq_len=16, batch_size=8, chunk_tokens=64, max_tokens=max_tokens,
                              progress=False, device="cpu")
        extract(opts)
        out[name] = Path(opts.out)
    return out


def reference(shallow: Path, deep: Path, select: str = "source", n: int | None = None) -> dict[str, np.ndarray]:
    """The analysis written directly: whole arrays (the first n tokens) in float64, the documented split,
    scikit-learn Ridge per pair."""
    a, b = (open_dataset(p).isel(token=slice(0, n)).load() for p in (shallow, deep))
    xs = np.concatenate([a.resid_pre.values, a.resid_final.values[None]]).astype(np.float64)
    ys = np.concatenate([b.resid_pre.values, b.resid_final.values[None]]).astype(np.float64)
    seq, pos = b.seq_id.values, b.position.values
    windows = np.unique(seq)
    order = windows[np.argsort((windows.astype(np.uint64) * 0x9E3779B1) % 2**32, kind="stable")]
    n_test = n_val = max(1, round(0.15 * len(windows)))
    test = np.isin(seq, order[:n_test]) & (pos > 0)
    val = np.isin(seq, order[n_test:n_test + n_val]) & (pos > 0)
    train = ~np.isin(seq, order[:n_test + n_val]) & (pos > 0)
    out = {k: np.zeros((len(xs), len(ys))) for k in ("r2", "rel_error", "penalty")}
    for i, x in enumerate(xs):
        centered = x[train] - x[train].mean(axis=0)
        alphas = np.asarray(lm.DEFAULT_GRID) * (centered**2).sum() / x.shape[1]  # grid × mean eigenvalue of C
        scores = np.array([[r2(y[val], Ridge(alpha=al).fit(x[train], y[train]).predict(x[val])) for al in alphas]
                           for y in ys])
        chosen = np.argmax(scores, axis=1) if select == "pair" else np.full(len(ys), np.argmax(scores.mean(0)))
        for j, y in enumerate(ys):
            pred = Ridge(alpha=alphas[chosen[j]]).fit(x[train], y[train]).predict(x[test])
            out["r2"][i, j] = r2(y[test], pred)
            out["rel_error"][i, j] = np.mean(np.linalg.norm(pred - y[test], axis=1) / np.linalg.norm(y[test], axis=1))
            out["penalty"][i, j] = alphas[chosen[j]]
    return out


def assert_matches(result, ref: dict[str, np.ndarray], rtol: float) -> None:
    """Every per-pair number equals the reference to ``rtol``."""
    for name in ("r2", "rel_error", "penalty"):
        np.testing.assert_allclose(result[name].values, ref[name], rtol=rtol, err_msg=name)


def test_analysis_equals_reference_on_tiny_stores(stores: dict[str, Path]) -> None:
    result = run("layer-map", str(stores["shallow"]), str(stores["deep"]), dtype="float64")
    assert_matches(result, reference(stores["shallow"], stores["deep"]), EXACT)
    assert result.r2.dims == ("shallow_layer", "deep_layer")
    assert result.shallow_layer.values.tolist() == [0, 1, 2] and result.deep_layer.values.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(result.shallow_relative_depth.values, [0, 0.5, 1])
    np.testing.assert_allclose(result.deep_relative_depth.values, [0, 0.25, 0.5, 0.75, 1])
    expected_best = result.shallow_layer.values[np.argmin(result.rel_error.values, axis=0)]
    np.testing.assert_array_equal(result.best_shallow_layer.values, expected_best)
    # boundary 0 of both models is the same embedding: the map is the identity, up to the penalty
    assert result.r2.sel(shallow_layer=0, deep_layer=0) > 0.999 > result.r2.sel(shallow_layer=0, deep_layer=1)
    assert (stores["deep"] / "analyses" / "layer-map").is_dir()  # cached in the DEEP store


def test_float32_products_and_several_passes_agree(stores: dict[str, Path]) -> None:
    shallow, deep = Store(str(stores["shallow"])), Store(str(stores["deep"]))
    one_pass = lm.layer_map(shallow, deep, select="pair", dtype="float64")
    per_source = lm.layer_map(shallow, deep, select="pair", dtype="float64", memory_gib=1e-9)
    assert per_source.attrs["passes"] == 3 and one_pass.attrs["passes"] == 1
    for name in ("r2", "rel_error", "penalty"):
        np.testing.assert_allclose(per_source[name].values, one_pass[name].values, rtol=1e-10)
    assert_matches(one_pass, reference(stores["shallow"], stores["deep"], select="pair"), EXACT)
    fast = lm.layer_map(shallow, deep, select="pair")  # float32 products: float32 rounding (~1e-5 here)
    np.testing.assert_allclose(fast.r2.values, one_pass.r2.values, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(fast.rel_error.values, one_pass.rel_error.values, rtol=1e-3, atol=1e-5)


def test_runs_on_a_distributed_cluster(stores: dict[str, Path]) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        result = run("layer-map", str(stores["shallow"]), str(stores["deep"]), force=True, dtype="float64",
                     scheduler_address=cluster.scheduler_address)
    assert_matches(result, reference(stores["shallow"], stores["deep"]), EXACT)


def test_max_tokens_fits_on_the_first_tokens_only(stores: dict[str, Path]) -> None:
    result = run("layer-map", str(stores["shallow"]), str(stores["deep"]), dtype="float64", max_tokens=200)
    assert result.attrs["tokens"] == 200
    assert_matches(result, reference(stores["shallow"], stores["deep"], n=200), EXACT)


def test_layer_subsets_map_only_those_boundaries(stores: dict[str, Path]) -> None:
    """-p shallow_layers=... deep_layers=...: the same pairs as the full map (the split and penalties do not depend
    on which pairs are fitted), the final residual named L."""
    whole = run("layer-map", str(stores["shallow"]), str(stores["deep"]), dtype="float64")
    part = run("layer-map", str(stores["shallow"]), str(stores["deep"]), dtype="float64", shallow_layers="1-2",
               deep_layers="0,3-4")
    assert part.shallow_layer.values.tolist() == [1, 2] and part.deep_layer.values.tolist() == [0, 3, 4]
    for name in ("r2", "rel_error", "penalty"):
        np.testing.assert_allclose(part[name].values, whole[name].sel(shallow_layer=[1, 2], deep_layer=[0, 3, 4]),
                                   rtol=1e-10, err_msg=name)
    with pytest.raises(DepthcacheError, match="out of range"):
        run("layer-map", str(stores["shallow"]), str(stores["deep"]), shallow_layers="7")


def copy_store(source: Path, dest: Path) -> zarr.Group:
    """A writable copy of a store."""
    shutil.copytree(source, dest)
    return zarr.open_group(str(dest), mode="r+")


def test_refuses_stores_with_other_tokens(stores: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DepthcacheError, match=r"holds \d[\d,]* tokens but .* holds 200"):
        run("layer-map", str(stores["shallow"]), str(stores["short"]))
    group = copy_store(stores["deep"], tmp_path / "edited.zarr")
    ids = group["token_id"][:]
    ids[37] = (ids[37] + 1) % 300
    group["token_id"][:] = ids
    with pytest.raises(DepthcacheError, match="token_id differ first at token 37"):
        run("layer-map", str(stores["shallow"]), str(tmp_path / "edited.zarr"))
    group = copy_store(stores["deep"], tmp_path / "other-tokenizer.zarr")
    attrs = read_attrs(group)
    attrs["model"]["tokenizer_sha256"] = "0" * 64
    write_attrs(group, attrs)
    with pytest.raises(DepthcacheError, match="tokenizers differ"):
        run("layer-map", str(stores["shallow"]), str(tmp_path / "other-tokenizer.zarr"))


def rewrite_tokenizer_file(group: zarr.Group, name: str, data: bytes) -> None:
    """Replace (or add) one stored tokenizer file and record the files' new sha256, as an extraction would."""
    tok = group["model/tokenizer"]
    files = {arr.attrs["filename"]: key for key, arr in tok.arrays()}
    key = files.get(name, f"file_{len(files)}")
    if key in tok:
        del tok[key]
    arr = model_array(tok, key, np.frombuffer(data, dtype=np.uint8), (f"byte_{key}",))
    arr.attrs["filename"] = name
    attrs = read_attrs(group)
    attrs["model"]["tokenizer_sha256"] = tokenizer_sha256(tokenizer_files(group))
    write_attrs(group, attrs)


def test_a_chat_template_alone_does_not_make_tokenizers_differ(stores: dict[str, Path], tmp_path: Path) -> None:
    """Two releases of one tokenizer (Qwen2.5-Coder 0.5B and 1.5B GGUFs) differ only in their chat template."""
    group = copy_store(stores["deep"], tmp_path / "templated.zarr")
    rewrite_tokenizer_file(group, "chat_template.jinja", b"{{ messages }}")
    templated = Store(str(tmp_path / "templated.zarr"))
    assert templated.attrs["model"]["tokenizer_sha256"] != Store(str(stores["shallow"])).attrs["model"][
        "tokenizer_sha256"]
    assert lm.same_tokenizer(Store(str(stores["shallow"])), templated)
    lm.check_same_tokens(Store(str(stores["shallow"])), templated)
    files = tokenizer_files(group)
    rewrite_tokenizer_file(group, "tokenizer.json", files["tokenizer.json"].replace(b'"', b'"', 1) + b" ")
    with pytest.raises(DepthcacheError, match="tokenizers differ"):
        lm.check_same_tokens(Store(str(stores["shallow"])), Store(str(tmp_path / "templated.zarr")))


def test_refuses_bad_parameters(stores: dict[str, Path]) -> None:
    for params, message in (({"site": "attn"}, "lacks attn_out"), ({"select": "best"}, "select must be"),
                            ({"grid": [0, 1]}, "positive penalty"), ({"dtype": "float16"}, "dtype must be")):
        with pytest.raises(DepthcacheError, match=message):
            run("layer-map", str(stores["shallow"]), str(stores["deep"]), **params)


# ------------------------------------------------------------------------------------------------- pruned copy

def test_pruned_copy_loads_and_keeps_the_original_weights(tiny_models, tmp_path: Path) -> None:
    src = tiny_models["llama"]
    folder = prune_copy(str(src), "0,3", str(tmp_path / "pruned"))
    pruned = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    original = transformers.AutoModelForCausalLM.from_pretrained(src).state_dict()
    assert transformers.AutoConfig.from_pretrained(folder).num_hidden_layers == 2
    renamed = {k.replace("layers.1.", "layers.3.") if ".layers.1." in k else k: v for k, v in pruned.items()}
    expected = {k: v for k, v in original.items() if ".layers.1." not in k and ".layers.2." not in k}
    assert renamed.keys() == expected.keys()
    for key, value in expected.items():
        assert (renamed[key] == value).all(), key
    with pytest.raises(DepthcacheError, match="already exists"):
        prune_copy(str(src), "every-other", str(folder))
    with pytest.raises(DepthcacheError, match="out of range"):
        prune_copy(str(src), "0,7", str(tmp_path / "bad"))
