"""Stores on object storage: push, analyse remotely, pull and report against a real S3 server on loopback (moto)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from test_extract import run

from depthcache.cli import main
from depthcache.sharing import listing, place
from depthcache.store import results

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


@pytest.fixture(scope="module")
def pushed(tiny_models, text_file, tmp_path_factory, s3_server) -> tuple[Path, str]:
    """A small local store with the analyses cached in it, and the URL it was pushed to."""
    store = run(tmp_path_factory.mktemp("shared"), tiny_models["llama"], text_file, dtype="bfloat16",
                max_tokens=192)
    for name in ANALYSES:
        assert invoke("analyze", name, str(store)).exit_code == 0
    url = f"s3://{BUCKET}/runs/a.zarr"
    result = invoke("push", str(store), url)
    assert result.exit_code == 0 and "every chunk verified" in result.output, result.output
    return store, url


def cached(where: Path | str, name: str, results_folder: bool = False) -> xr.Dataset:
    """The one cached result of analysis ``name`` in a local store (or a --results folder)."""
    place = results.Place(str(where)) if results_folder else results.Place(str(where), results.IN_STORE)
    (entry,) = results.entries(place, name)
    return results.load(entry)


def test_analyze_remotely_then_pull_and_compare(pushed, tmp_path, s3_server) -> None:
    store, url = pushed
    # credentials and endpoint from the environment; --storage-option passes fsspec options explicitly
    info = invoke("info", url, "--storage-option", f"endpoint_url={s3_server}")
    assert info.exit_code == 0 and "192 of 192 committed (complete)" in info.output, info.output
    assert invoke("validate", url).output.startswith(f"{url}: valid; read and verified")
    before = listing(place(url))
    for name in ANALYSES:
        pushed_along = invoke("analyze", name, url, "--results", str(tmp_path / "remote"))
        assert pushed_along.exit_code == 0 and not (tmp_path / "remote" / name).exists()  # the store's own result
        remote = invoke("analyze", name, url, "--results", str(tmp_path / "remote"), "--force")
        assert remote.exit_code == 0, remote.output
        results_equal(cached(tmp_path / "remote", name, results_folder=True), cached(store, name))
    assert listing(place(url)) == before  # the remote store is only read
    pulled = tmp_path / "pulled.zarr"
    result = invoke("pull", url, str(pulled))
    assert result.exit_code == 0 and "every chunk verified" in result.output
    assert invoke("analyze", "residual-norms", str(pulled), "--force").exit_code == 0
    results_equal(cached(pulled, "residual-norms"), cached(store, "residual-norms"))


def test_interrupted_push_resumes_and_half_pushed_store_never_looks_complete(pushed, s3_server) -> None:
    store, _ = pushed
    url = f"s3://{BUCKET}/runs/partial.zarr"
    src, dst = place(str(store)), place(url)
    keys = sorted(k for k in listing(src) if k != "zarr.json")
    for key in keys[::2]:  # an interrupted push: half of the objects, never the root metadata
        dst.fs.pipe_file(dst.path(key), src.fs.cat_file(src.path(key)))
    half = invoke("info", url)
    assert half.exit_code == 2 and half.output.startswith("error: ") and "Traceback" not in half.output
    damaged = next(k for k in keys[::2] if "/c/" in k and not k.startswith("analyses/"))
    data = bytearray(src.fs.cat_file(src.path(damaged)))
    data[0] ^= 0xFF  # same size, different bytes and checksum (a torn write): recopied, not skipped
    dst.fs.pipe_file(dst.path(damaged), bytes(data[:-4]) + b"\0\0\0\0")
    resumed = invoke("push", str(store), url)
    assert resumed.exit_code == 0, resumed.output
    skipped = int(resumed.output.split("MiB), ")[1].split(" already")[0])
    chunks = [k for k in keys if "/c/" in k and not k.startswith("analyses/")]
    assert skipped == len(set(chunks) & set(keys[::2])) - 1  # every chunk already there but the damaged one
    assert invoke("validate", url).output.startswith(f"{url}: valid; read and verified")
    again = invoke("push", str(store), url)
    assert again.exit_code == 0 and f"{len(chunks)} already there" in again.output


def test_push_refuses_a_different_store_at_the_destination(pushed, tmp_path, s3_server) -> None:
    store, url = pushed
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["depthcache"]["created"] = "2020-01-01T00:00:00+00:00"
    (other / "zarr.json").write_text(json.dumps(meta))
    refused = invoke("push", str(other), url)
    assert refused.exit_code == 2 and "already holds a different store" in refused.output


def test_report_of_a_remote_store(pushed, tmp_path, s3_server) -> None:
    _, url = pushed
    out = tmp_path / "report.html"
    result = invoke("report", url, "--out", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert all(f'id="analysis-{name}"' in page for name in ANALYSES)
    assert "data:image/png;base64," in page and url in page


def test_analyses_on_a_cluster_read_the_remote_store(pushed, tmp_path, s3_server) -> None:
    """The analyses through --scheduler on a dask.distributed LocalCluster reading s3:// directly."""
    from distributed import LocalCluster

    store, url = pushed
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        for name in ANALYSES:
            remote = invoke("analyze", name, url, "--results", str(tmp_path / "cluster"), "--scheduler",
                            cluster.scheduler_address, "--force")
            assert remote.exit_code == 0, remote.output
    for name in ANALYSES:
        # same graph; float32 block products may round differently across workers: rtol 1e-5
        results_equal(cached(tmp_path / "cluster", name, results_folder=True), cached(store, name), rtol=1e-5)


def test_push_and_pull_with_a_missing_bucket_are_one_line_errors(pushed, tmp_path, s3_server) -> None:
    store, _ = pushed
    for args in (("push", str(store), "s3://no-such-bucket/runs/a.zarr"),
                 ("pull", "s3://no-such-bucket/runs/a.zarr", str(tmp_path / "p.zarr"))):
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == 2, result.output
        assert result.output == ("error: the bucket s3://no-such-bucket does not exist (or these credentials cannot "
                                 "see it): create it first (e.g. aws s3 mb s3://no-such-bucket), or name an "
                                 "existing bucket\n")
    assert not (tmp_path / "p.zarr").exists()


def test_report_of_a_remote_store_shows_the_results_folder(pushed, tmp_path, s3_server) -> None:
    """Results computed for a URL store live in a local folder; report --results finds them there."""
    _, url = pushed
    folder = tmp_path / "mine"
    assert invoke("analyze", "logit-lens", url, "--results", str(folder), "-p", "max_tokens=64").exit_code == 0
    out = tmp_path / "report.html"
    without = invoke("report", url, "--out", str(out))
    assert without.exit_code == 0 and "max_tokens=64" not in out.read_text()
    result = invoke("report", url, "--results", str(folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    # beside the pushed default
    ci = "ci_level=0.95, ci_resamples=1000, ci_seed=0, "  # the interval parameters' defaults
    assert f'id="analysis-logit-lens ({ci}include_first=false, layers=&quot;all&quot;, max_tokens=64)"' in page
    assert f'id="analysis-logit-lens ({ci}include_first=false, layers=&quot;all&quot;, max_tokens=null)"' in page
    info = invoke("info", url, "--results", str(folder)).output
    assert f'logit-lens      {ci}include_first=false, layers="all", max_tokens=64' in info


def test_opening_a_remote_store_validates_it_once(pushed, s3_server, monkeypatch) -> None:
    """Every S3 request goes through s3fs's ``_call_s3``: opening lists the store at most as often as one check does
    plus one listing of the group's members (two checks, as before, list it at least twice as often)."""
    import s3fs

    import depthcache
    from depthcache.store import Store, check_store, open_group

    _, url = pushed
    calls: list[str] = []
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):  # noqa: ANN001, ANN202 - s3fs's private signature
        calls.append(getattr(method, "__name__", str(method)))
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    s3fs.S3FileSystem.clear_instance_cache()
    check_store(open_group(url))
    one_check = [c for c in calls if "list" in c.lower()]
    assert one_check, f"a check lists the store's chunk keys: {calls}"
    calls.clear()
    s3fs.S3FileSystem.clear_instance_cache()  # a fresh filesystem each time: no listing cached from before
    ds = depthcache.open(url)
    assert ds.sizes["token"] == 192 and "position" in ds.coords
    assert len([c for c in calls if "list" in c.lower()]) <= len(one_check) + 1 < 2 * len(one_check) + 1, calls
    calls.clear()
    s3fs.S3FileSystem.clear_instance_cache()
    store = Store(url)
    _ = store.attrs, store.ds, store.run  # what analyses read: validated once, however often they ask
    _ = store.ds.resid_pre, store.attrs
    assert len([c for c in calls if "list" in c.lower()]) <= len(one_check) + 1 < 2 * len(one_check) + 1, calls


@pytest.fixture
def one_try(monkeypatch) -> list[str]:
    """Storage options trying each request once with 2 s timeouts (s3fs's own retries off): a failure shows in
    seconds instead of after a minute of retries."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    return ["--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, '
                                '"read_timeout": 2}']


def remote_commands(store: Path, url: str, tmp_path: Path) -> list[tuple[str, ...]]:
    """Every command that reads or writes a URL, reading or writing ``url``."""
    return [("info", url), ("validate", url), ("analyze", "residual-norms", url, "--results", str(tmp_path / "r")),
            ("plot", "residual-norms", url, "--results", str(tmp_path / "r"), "--out", str(tmp_path / "p")),
            ("report", url, "--out", str(tmp_path / "r.html")), ("pull", url, str(tmp_path / "p.zarr")),
            ("push", str(store), url), ("compare", url, url, "--out", str(tmp_path / "c"))]


def one_remote_error(args: tuple[str, ...], extra: list[str], url: str, *needles: str) -> None:
    """The command fails with one 'error:' line naming ``url`` and ``needles``, no traceback."""
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert result.output.startswith(f"error: cannot reach {url}: ") and result.output.count("\n") == 1, \
        (args, result.output)
    for needle in needles:
        assert needle in result.output, (args, result.output)


def test_unreachable_servers_are_one_line_naming_the_url(pushed, tmp_path, s3_server, one_try) -> None:
    import socket

    from moto.server import ThreadedMotoServer

    store, _ = pushed
    stopped = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    stopped.start()
    host, port = stopped.get_host_and_port()
    stopped.stop()  # a local S3 server that was stopped: nothing listens there any more
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        wrong_port = free.getsockname()[1]
    url = f"s3://{BUCKET}/runs/a.zarr"
    for endpoint in (f"http://{host}:{port}", f"http://127.0.0.1:{wrong_port}"):
        for args in remote_commands(store, url, tmp_path):
            one_remote_error(args, [*one_try, "--storage-option", f"endpoint_url={endpoint}"], url,
                             "EndpointConnectionError", endpoint.removeprefix("http://"))
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers: a timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for args in (("info", url), ("pull", url, str(tmp_path / "p.zarr"))):
            one_remote_error(args, [*one_try, "--storage-option", f"endpoint_url={endpoint}"], url, "Timeout")
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "r").exists()


def test_wrong_credentials_are_one_line_naming_the_url(pushed, tmp_path, s3_server, one_try, monkeypatch) -> None:
    import moto.settings

    import depthcache
    from depthcache.errors import DepthcacheError

    store, url = pushed
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks credentials now
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    options = [*one_try, "--storage-option", f"endpoint_url={s3_server}"]
    for args in remote_commands(store, url, tmp_path):
        one_remote_error(args, options, url, "Forbidden", "credentials")
    with pytest.raises(DepthcacheError, match=f"cannot reach {url}: PermissionError: Forbidden"):
        depthcache.open(url, storage_options={"endpoint_url": s3_server, "config_kwargs": {"retries": {
            "max_attempts": 1}}})
