"""The same analyses on a dask.distributed LocalCluster of worker processes give the default scheduler's results."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
from conftest import write_documents
from distributed import LocalCluster

from depthcache.analyze import run
from depthcache.extraction.engine import ExtractOptions, extract


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small bf16 store of the tiny Llama (several chunks, so several tasks per analysis)."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "docs.jsonl"
    write_documents(data, [1 + i for i in range(6)])
    out = root / "store.zarr"
    extract(ExtractOptions(out=str(out), model=str(tiny_models["llama"]), data=str(data), dtype="bfloat16",
                           seq_len=40, batch_size=4, chunk_tokens=32, progress=False, device="cpu"))
    return str(out)


def test_process_cluster_matches_default_scheduler(store, tmp_path):
    names = ("contributions", "logit-lens", "residual-norms")
    local = {name: run(name, store, results_dir=str(tmp_path / "local")) for name in names}
    # LocalCluster sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in this process's environment and leaves them: later tests'
    # subprocesses would then compute with one thread and round differently from the in-process runs they are
    # compared with
    with mock.patch.dict(os.environ), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = {name: run(name, store, scheduler_address=cluster.scheduler_address,
                            results_dir=str(tmp_path / "remote")) for name in names}
    for name in names:
        assert set(remote[name].data_vars) == set(local[name].data_vars)
        for var in local[name].data_vars:
            np.testing.assert_array_equal(remote[name][var].values, local[name][var].values, err_msg=f"{name}.{var}")
