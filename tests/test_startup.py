"""Start-up: each command imports only what it needs (extract: no xarray, pandas or dask; analyses: no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def modules_after(code: str) -> set[str]:
    """Top-level modules imported by a fresh interpreter running ``code``."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_extraction_does_not_import_the_readers_libraries() -> None:
    loaded = modules_after("import depthcache.extraction.engine")
    assert "torch" in loaded and "zarr" in loaded
    assert not loaded & {"xarray", "pandas", "dask", "matplotlib"}


def test_computing_an_analysis_does_not_import_torch() -> None:
    loaded = modules_after("import depthcache.analyze as a\na.load_all()")
    assert "xarray" in loaded and "dask" in loaded
    assert not loaded & {"torch", "transformers"}


HEAVY_FOR_ANALYSES = {"matplotlib", "scipy", "sklearn", "torch", "transformers", "distributed", "ml_dtypes"}


def cli_modules(args: list[str]) -> set[str]:
    """Every module imported by ``depthcache ARGS`` run as the command line runs it (exit status 0)."""
    code = ("import sys, runpy\n"
            f"sys.argv = ['depthcache', *{args!r}]\n"
            "try:\n    runpy.run_module('depthcache.cli', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('MODULES', ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split("MODULES", 1)[1].split())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_analyze_command_imports_only_what_it_computes_with(dtype, tmp_path, tiny_models) -> None:
    """`analyze contributions`: no plotting, scipy, model or bf16 libraries (a bf16 store is widened by bit shift),
    no other analysis; the result is the same as the library's."""
    from test_analyses import make_store

    from depthcache.analyze import run

    store = make_store(tmp_path, tiny_models["llama"], dtype)
    modules = cli_modules(["analyze", "contributions", str(store), "--force", "--results", str(tmp_path / "r")])
    loaded = {name.split(".")[0] for name in modules}
    assert "dask" in loaded and "xarray" in loaded
    assert not loaded & HEAVY_FOR_ANALYSES, loaded & HEAVY_FOR_ANALYSES
    assert "depthcache.analyze.contributions" in modules
    assert not modules & {"depthcache.analyze.layer_map", "depthcache.analyze.logit_lens", "depthcache.locate"}
    cached = run("contributions", str(store), results_dir=str(tmp_path / "r"))
    fresh = run("contributions", str(store), force=True, results_dir=str(tmp_path / "r2"))
    assert cached.equals(fresh)


def test_bfloat16_reaches_analyses_as_exact_float32_and_users_as_bfloat16(tmp_path, tiny_models) -> None:
    """Analyses read a bf16 store as float32 without ml_dtypes; ``depthcache.open`` gives ml_dtypes bfloat16 whose
    float32 cast is bit for bit what the analyses read."""
    from test_analyses import make_store

    store = make_store(tmp_path, tiny_models["llama"], "bfloat16")
    code = ("import sys\nimport numpy as np\nfrom depthcache.store.reader import Store\n"
            f"s = Store({str(store)!r})\nx = s.ds.resid_pre.values\nloaded = 'ml_dtypes' in sys.modules\n"
            f"import depthcache\ny = depthcache.open({str(store)!r}).resid_pre.values\n"
            "print(x.dtype, loaded, y.dtype, np.array_equal(x.view(np.uint32), y.astype(np.float32).view(np.uint32)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["float32", "False", "bfloat16", "True"]
