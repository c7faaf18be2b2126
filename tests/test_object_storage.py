"""Stores on object storage: push, analyse remotely, pull and report against a real S3 server on loopback (moto)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from depthcache.cli import main
from depthcache.sharing import listing, place
from test_extract import run

BUCKET = "depthcache-test"
# the analyses of a plain baseline store (skip-effects needs skip runs, task analyses a task store)
ANALYSES = ("residual-norms", "contributions", "logit-lens")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (free port) with a bucket, and the AWS env vars pointing at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    place(f"s3://{BUCKET}", {"endpoint_url": endpoint}).fs.mkdir(BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def invoke(*args: str):  # noqa: ANN201 - click Result
    """Run the CLI in-process; failures show their output."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def results_equal(a: xr.Dataset, b: xr.Dataset, rtol: float = 0.0) -> None:
    """Two analysis results hold the same numbers (default bit-identical: same chunks, same reduction order)."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=rtol, atol=0)


def test_push_analyze_remotely_pull_and_compare(tiny_models, text_file, tmp_path, s3_server) -> None:
    store = run(tmp_path, tiny_models["llama"], text_file, dtype="bfloat16")
    url = f"s3://{BUCKET}/runs/a.zarr"
    pushed = invoke("push", str(store), url)
    assert pushed.exit_code == 0 and "every chunk verified" in pushed.output, pushed.output
    # credentials and endpoint from the environment; --storage-option passes fsspec options explicitly
    info = invoke("info", url, "--storage-option", f"endpoint_url={s3_server}")
    assert info.exit_code == 0 and "431 of 431 committed (complete)" in info.output, info.output
    assert invoke("validate", url).output.strip().endswith("valid")
    for name in ANALYSES:
        remote = invoke("analyze", name, url, "--results", str(tmp_path / "remote-results"))
        assert remote.exit_code == 0, remote.output
        local = invoke("analyze", name, str(store))
        assert local.exit_code == 0 and remote.output == local.output
        results_equal(xr.open_zarr(tmp_path / "remote-results" / f"{name}.zarr", consolidated=False).load(),
                      xr.open_zarr(store, group=f"analyses/{name}", consolidated=False).load())
    assert not any(k.startswith("analyses/") for k in listing(place(url)))  # the remote store stayed read-only
    pulled = tmp_path / "pulled.zarr"
    assert invoke("pull", url, str(pulled)).exit_code == 0
    assert invoke("analyze", "residual-norms", str(pulled)).exit_code == 0
    results_equal(xr.open_zarr(pulled, group="analyses/residual-norms", consolidated=False).load(),
                  xr.open_zarr(store, group="analyses/residual-norms", consolidated=False).load())
    assert listing(place(str(pulled))).keys() >= listing(place(url)).keys()


def test_interrupted_push_resumes_and_half_pushed_store_never_looks_complete(tiny_models, text_file, tmp_path,
                                                                              s3_server) -> None:
    store = run(tmp_path, tiny_models["gpt2"], text_file)
    url = f"s3://{BUCKET}/runs/partial.zarr"
    src, dst = place(str(store)), place(url)
    keys = sorted(k for k in listing(src) if k != "zarr.json")
    for key in keys[::2]:  # an interrupted push: half of the objects, never the root metadata
        dst.fs.pipe_file(dst.path(key), src.fs.cat_file(src.path(key)))
    half = invoke("info", url)
    assert half.exit_code == 2 and half.output.startswith("error: ") and "Traceback" not in half.output
    damaged = keys[0] if "/c/" in keys[0] else next(k for k in keys[::2] if "/c/" in k)
    data = bytearray(src.fs.cat_file(src.path(damaged)))
    data[0] ^= 0xFF  # same size, different bytes and checksum (a torn write): recopied, not skipped
    dst.fs.pipe_file(dst.path(damaged), bytes(data[:-4]) + b"\0\0\0\0")
    resumed = invoke("push", str(store), url)
    assert resumed.exit_code == 0, resumed.output
    skipped = int(resumed.output.split("MiB), ")[1].split(" already")[0])
    chunks_pushed = sum("/c/" in k for k in keys[::2])
    assert skipped == chunks_pushed - 1  # every chunk already there except the damaged one
    assert invoke("validate", url).output.strip().endswith("valid")
    again = invoke("push", str(store), url)
    assert again.exit_code == 0 and f"{sum('/c/' in k for k in keys)} already there" in again.output


def test_push_refuses_a_different_store_at_the_destination(tiny_models, text_file, tmp_path, s3_server) -> None:
    one = run(tmp_path, tiny_models["gpt2"], text_file, name="one.zarr")
    other = run(tmp_path, tiny_models["qwen2"], text_file, name="other.zarr")
    url = f"s3://{BUCKET}/runs/taken.zarr"
    assert invoke("push", str(one), url).exit_code == 0
    refused = invoke("push", str(other), url)
    assert refused.exit_code == 2 and "already holds a different store" in refused.output


def test_report_of_a_remote_store(tiny_models, text_file, tmp_path, s3_server) -> None:
    store = run(tmp_path, tiny_models["llama"], text_file)
    assert invoke("analyze", "residual-norms", str(store)).exit_code == 0
    url = f"s3://{BUCKET}/runs/report.zarr"
    assert invoke("push", str(store), url).exit_code == 0
    out = tmp_path / "report.html"
    result = invoke("report", url, "--out", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert 'id="analysis-residual-norms"' in page and "data:image/png;base64," in page and url in page


def test_analyses_on_a_cluster_read_the_remote_store(tiny_models, text_file, tmp_path, s3_server) -> None:
    """Every single-store analysis through --scheduler on a dask.distributed LocalCluster reading s3:// directly."""
    from distributed import LocalCluster

    store = run(tmp_path, tiny_models["qwen2"], text_file, dtype="bfloat16", max_tokens=192)
    url = f"s3://{BUCKET}/runs/cluster.zarr"
    assert invoke("push", str(store), url).exit_code == 0
    names = ANALYSES
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        for name in names:
            remote = invoke("analyze", name, url, "--results", str(tmp_path / "cluster"), "--scheduler",
                            cluster.scheduler_address)
            assert remote.exit_code == 0, remote.output
    for name in names:
        assert invoke("analyze", name, str(store)).exit_code == 0
        # same graph; float32 block products may round differently across workers: rtol 1e-5
        results_equal(xr.open_zarr(tmp_path / "cluster" / f"{name}.zarr", consolidated=False).load(),
                      xr.open_zarr(store, group=f"analyses/{name}", consolidated=False).load(), rtol=1e-5)
