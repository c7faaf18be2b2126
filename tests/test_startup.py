"""Start-up: each command imports only what it needs (extract: no xarray, pandas or dask; analyses: no torch)."""

from __future__ import annotations

import subprocess
import sys


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
