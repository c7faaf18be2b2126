"""What users install: the wheel and sdist carry every runtime file, and the installed package (not the checkout)
extracts, opens, validates, analyses and plots a store, through the CLI and the xarray engine."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_FILES = ("depthcache/store/store.schema.json", "depthcache/tasks/two_hop_facts.json")


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command, failing the test with its output when it fails."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sdist built from the checkout and a wheel built from that sdist (as a package index would), offline."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO, cwd=out)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the built wheel (non-editable); its dependencies come from this venv's
    site-packages through a .pth path line (no .pth hooks run there, so the editable checkout stays invisible)."""
    root = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", root / "v", cwd=root)
    python = root / "v" / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).strip())
    wheel = next(dist.glob("depthcache-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # a wheel is installed by unpacking it; entry points become scripts
        archive.extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_wheel_and_sdist_carry_the_runtime_files(dist: Path) -> None:
    wheel_names = zipfile.ZipFile(next(dist.glob("depthcache-*.whl"))).namelist()
    sdist_names = tarfile.open(next(dist.glob("depthcache-*.tar.gz"))).getnames()
    for name in RUNTIME_FILES:
        assert name in wheel_names, f"the wheel lacks {name}"
        assert any(n.endswith(name) for n in sdist_names), f"the sdist lacks {name}"
    entry_points = next(n for n in wheel_names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(next(dist.glob("depthcache-*.whl"))).read(entry_points).decode()
    assert "[xarray.backends]" in text and "depthcache = depthcache.store.backend" in text


def test_installed_package_reads_and_analyses_a_store(venv: Path, tiny_models, text_file, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {"MPLBACKEND": "Agg"}
    cli = (venv, "-m", "depthcache.cli")
    where = run(venv, "-c", "import depthcache; print(depthcache.__file__)", cwd=tmp_path, env=env)
    assert str(REPO) not in where, f"the installed package imported the checkout: {where}"
    store = tmp_path / "s.zarr"
    run(*cli, "extract", "--model", tiny_models["llama"], "--data", text_file, "--out", store, "--max-tokens", "96",
        "--seq-len", "32", "--batch-size", "2", "--no-progress", cwd=tmp_path, env=env)
    assert "tokens" in run(*cli, "info", store, cwd=tmp_path, env=env)
    assert "valid" in run(*cli, "validate", store, cwd=tmp_path, env=env)
    run(*cli, "analyze", "contributions", store, cwd=tmp_path, env=env)
    assert ".png" in run(*cli, "plot", "residual-norms", store, cwd=tmp_path, env=env)
    opened = run(venv, "-c", "import sys, xarray as xr; ds = xr.open_dataset(sys.argv[1], engine='depthcache'); "
                 "print(ds.sizes['token'], 'position' in ds.coords)", store, cwd=tmp_path, env=env)
    assert opened.split() == ["96", "True"]
    items = run(venv, "-c", "from depthcache.tasks import load_task; print(len(load_task('two-hop-facts', n=2)) > 2)",
                cwd=tmp_path, env=env)  # the fact table is package data
    assert items.strip() == "True"
