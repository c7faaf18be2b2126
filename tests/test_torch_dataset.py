"""depthcache.torch.ActivationDataset: every committed token exactly once per epoch across workers and ranks, rows
equal to the store's, shuffling by whole chunks, bf16 tensors, metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import CORPUS, save_tiny_model

import depthcache
from depthcache.dtypes import BFLOAT16
from depthcache.errors import DepthcacheError
from depthcache.torch import ActivationDataset, BufferPool, Shard, chunk_order, shard_chunks


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 store with 11 chunks of 16 tokens (the last one short) and a float32 task store."""
    root = tmp_path_factory.mktemp("torch-stores")
    model = save_tiny_model("llama", root / "llama")
    texts = [" ".join(CORPUS[(i + j) % 4] for j in range(i % 3 + 1)) for i in range(8)]
    depthcache.extract(str(model), texts, out=root / "bf16.zarr", seq_len=32, chunk_tokens=16, device="cpu",
                       max_tokens=170)
    depthcache.extract(str(model), "task:two-hop-facts?n=2", out=root / "task.zarr", dtype="float32", seq_len=64,
                       chunk_tokens=16, device="cpu")
    return {"bf16": root / "bf16.zarr", "task": root / "task.zarr"}


def read_all(dataset: ActivationDataset, workers: int) -> list[dict[str, torch.Tensor]]:
    """Every batch a DataLoader with ``workers`` processes yields."""
    return list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))


def test_every_token_once_per_epoch_across_two_workers_and_two_ranks(stores: dict[str, Path]) -> None:
    ds = depthcache.open(stores["bf16"])
    assert ds.sizes["token"] == 170
    expected = ds.depthcache.float32().resid_pre.sel(layer=[1, 3]).values  # (layer, token, d_model)
    for epoch in (0, 1):
        seen, orders = [], []
        for rank in (0, 1):
            data = ActivationDataset(stores["bf16"], "resid_pre", layers=[1, 3], batch_size=5, shuffle=True,
                                     buffer_chunks=2, rank=rank, world_size=2)
            data.set_epoch(epoch)
            for batch in read_all(data, workers=2):
                tokens = batch["token"].numpy()
                assert batch["activations"].dtype == torch.float32 and batch["activations"].shape[1:] == (2, 64)
                np.testing.assert_array_equal(batch["activations"].numpy(), expected[:, tokens].transpose(1, 0, 2))
                np.testing.assert_array_equal(batch["position"].numpy(), ds.position.values[tokens])
                np.testing.assert_array_equal(batch["next_token_id"].numpy(), ds.next_token_id.values[tokens])
                seen += tokens.tolist()
                orders.append(tokens)
        assert sorted(seen) == list(range(170)), f"epoch {epoch}: tokens missing or repeated"
        assert any(not np.all(np.diff(t) == 1) for t in orders), "rows inside a buffer are shuffled"


def test_chunks_are_dealt_out_disjointly_and_reshuffled_each_epoch() -> None:
    order = chunk_order(11, shuffle=True, seed=0, epoch=0)
    parts = [shard_chunks(order, Shard(r, 2), Shard(w, 2)) for r in range(2) for w in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))
    assert not np.array_equal(order, chunk_order(11, shuffle=True, seed=0, epoch=1))
    assert np.array_equal(order, chunk_order(11, shuffle=True, seed=0, epoch=0))
    assert chunk_order(11, shuffle=False, seed=0, epoch=3).tolist() == list(range(11))


def test_rows_bf16_single_layer_final_residual_and_task_metadata(stores: dict[str, Path]) -> None:
    ds = depthcache.open(stores["bf16"])
    rows = list(ActivationDataset(stores["bf16"], "mlp_out", layers=2, dtype=torch.bfloat16))
    assert len(rows) == 170 and rows[7]["activations"].shape == (64,) and rows[7]["activations"].dtype == torch.bfloat16
    bits = ds.mlp_out.sel(layer=2).values.view(np.int16)
    np.testing.assert_array_equal(torch.stack([r["activations"] for r in rows]).view(torch.int16).numpy(), bits)
    final = next(iter(ActivationDataset(stores["bf16"], "resid_final", batch_size=170)))
    np.testing.assert_array_equal(final["activations"].numpy(), ds.resid_final.values.astype(np.float32))
    task = depthcache.open(stores["task"])
    batch = next(iter(ActivationDataset(stores["task"], batch_size=1000)))
    assert batch["activations"].shape == (task.sizes["token"], 4, 64)
    np.testing.assert_array_equal(batch["answer_index"].numpy(), task.answer_index.values)
    np.testing.assert_array_equal(batch["item"].numpy(), task.item.values)
    dropped = list(ActivationDataset(stores["bf16"], batch_size=16, drop_last=True))
    assert all(len(b["token"]) == 16 for b in dropped) and len(dropped) == 170 // 16
    data = ActivationDataset(stores["bf16"], rank=1, world_size=2)
    assert data.rows() == 16 * 5  # chunks 1, 3, 5, 7, 9


def test_bad_requests_are_refused(stores: dict[str, Path]) -> None:
    with pytest.raises(DepthcacheError, match="unknown site"):
        ActivationDataset(stores["bf16"], "resid_post")
    with pytest.raises(DepthcacheError, match="not stored"):
        ActivationDataset(stores["bf16"], layers=[7])
    with pytest.raises(DepthcacheError, match="no layers"):
        ActivationDataset(stores["bf16"], "resid_final", layers=[0])
    with pytest.raises(DepthcacheError, match="outside a world"):
        next(iter(ActivationDataset(stores["bf16"], rank=2, world_size=2)))


def rows_of(batches: list[dict[str, torch.Tensor]]) -> dict[int, np.ndarray]:
    """Each yielded token's activations (as float64 numpy), keyed by the token's index; no token twice."""
    out: dict[int, np.ndarray] = {}
    for batch in batches:
        for token, row in zip(batch["token"].tolist(), batch["activations"].double().numpy()):
            assert token not in out
            out[token] = row
    return out


def test_batches_yield_the_same_rows_as_single_rows(stores: dict[str, Path]) -> None:
    """Batch mode (shuffled or not, through workers or not) yields the same multiset of rows as row mode."""
    single = [{key: value[None] for key, value in row.items()}
              for row in ActivationDataset(stores["bf16"], layers=[0, 2])]
    reference = rows_of(single)
    assert sorted(reference) == list(range(170))
    for shuffle, workers, dtype in ((False, 0, torch.float32), (False, 2, torch.float32), (True, 0, torch.float32),
                                    (True, 2, torch.bfloat16)):  # workers: batches are views of shared memory
        batched = read_all(ActivationDataset(stores["bf16"], layers=[0, 2], batch_size=7, shuffle=shuffle,
                                             buffer_chunks=3, dtype=dtype), workers)
        sizes = [len(b["token"]) for b in batched]
        assert sizes.count(7) >= len(sizes) - workers - 1  # each worker's last batch may be short
        assert all(b["activations"].dtype == dtype for b in batched)
        got = rows_of(batched)
        assert sorted(got) == sorted(reference)
        for token, row in got.items():
            np.testing.assert_array_equal(row, reference[token])


def test_shuffle_inside_zarrs_copy_equals_read_then_gather(stores: dict[str, Path]) -> None:
    """The scatter of rows inside zarr's chunk copy gives exactly the order (and rows) of the fallback that reads
    in place and gathers; unsorted and strided layer selections and float16 rows are right too."""
    ds = depthcache.open(stores["bf16"])
    values = ds.depthcache.float32().resid_pre.values  # (layer, token, d_model)
    for layers in ([0, 2], [3, 1], [1, 2, 3], None):
        scattered = ActivationDataset(stores["bf16"], layers=layers, batch_size=32, shuffle=True, buffer_chunks=2)
        gathered = ActivationDataset(stores["bf16"], layers=layers, batch_size=32, shuffle=True, buffer_chunks=2)
        gathered.scatter = False
        assert scattered.scatter == (layers != [3, 1])
        index = list(range(4)) if layers is None else layers
        for one, two in zip(scattered, gathered, strict=True):
            np.testing.assert_array_equal(one["token"].numpy(), two["token"].numpy())
            np.testing.assert_array_equal(one["doc_id"].numpy(), two["doc_id"].numpy())
            np.testing.assert_array_equal(one["doc_id"].numpy(), ds.doc_id.values[one["token"].numpy()])
            np.testing.assert_array_equal(one["activations"].numpy(), two["activations"].numpy())
            np.testing.assert_array_equal(one["activations"].numpy(),
                                          values[index][:, one["token"].numpy()].transpose(1, 0, 2))
        assert scattered.scatter == (layers != [3, 1]), "zarr wrote every chunk through ScatterRows"
    half = next(iter(ActivationDataset(stores["bf16"], layers=[2], batch_size=170, dtype=torch.float16,
                                       shuffle=True)))
    stored = torch.from_numpy(ds.resid_pre.sel(layer=2).values.view(np.int16)).view(torch.bfloat16)
    assert half["activations"].dtype == torch.float16
    np.testing.assert_array_equal(half["activations"].numpy(), stored[half["token"]].to(torch.float16)[:, None].numpy())


def test_buffer_pool_reuses_only_buffers_nothing_references() -> None:
    pool = BufferPool(keep=2)
    first = pool.get((4, 3), np.dtype(np.float32))
    held = torch.from_numpy(first[1:3])  # a batch view still alive
    first_id = id(first)
    del first
    second = pool.get((4, 3), np.dtype(np.float32))
    assert id(second) != first_id and held.data_ptr() != second.ctypes.data
    del second
    assert pool.get((4, 3), np.dtype(np.float32)) is pool.buffers[0]  # free again: reused
    del held
    assert pool.get((2, 3), np.dtype(np.float32)).shape == (2, 3) and len(pool.buffers) == 2


@pytest.fixture()
def pools(monkeypatch: pytest.MonkeyPatch) -> list[BufferPool]:
    """Every BufferPool the dataset makes while the test runs, in order."""
    made: list[BufferPool] = []

    class Recorded(BufferPool):
        def __init__(self, keep: int = 2) -> None:
            super().__init__(keep)
            made.append(self)

    monkeypatch.setattr("depthcache.torch.BufferPool", Recorded)
    return made


def test_buffers_are_reused_while_streaming(stores: dict[str, Path], pools: list[BufferPool]) -> None:
    """A consumer that drops its batches gets 11 one-chunk buffers from two allocations (plus the short last one;
    shuffled, the short one can come earlier and push a full one out of the pool)."""
    tokens = [len(batch["token"]) for batch in ActivationDataset(stores["bf16"], batch_size=8, buffer_chunks=1)]
    assert sum(tokens) == 170 and pools[0].allocated == 3


def special_bf16_store(source: Path, out: Path) -> np.ndarray:
    """A copy of ``source`` whose resid_pre holds chosen bf16 bit patterns (both zeros, subnormals, the extremes,
    infinities, quiet and signalling NaNs with payloads, then random patterns); returns them (layer, token, d)."""
    shutil.copytree(source, out)
    array = zarr.open_array(out / "resid_pre", mode="r+")
    special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x807F, 0x0080, 0x8080, 0x7F7F, 0xFF7F, 0x7F80,
                        0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x3F80, 0xBF80], dtype=np.uint16)
    bits = np.random.default_rng(7).integers(0, 1 << 16, size=array.shape, dtype=np.uint16)
    bits.reshape(-1)[:special.size] = special
    bits[:, -1, :special.size] = special  # in the last, short chunk too
    array[...] = bits.view(BFLOAT16)
    return bits


def test_float32_rows_are_the_exact_widening_of_bf16_and_batches_are_independent(
        stores: dict[str, Path], tmp_path: Path, pools: list[BufferPool]) -> None:
    """Float32 rows from a bf16 store are bit for bit numpy's ``astype(float32)`` (signed zeros, subnormals, inf,
    NaN payloads), shuffled or not, in process or through workers; a consumer that writes into its batches in place
    does not change the batches after them (the pooled buffers they reuse are rewritten whole)."""
    bits = special_bf16_store(stores["bf16"], tmp_path / "special.zarr")
    widened = bits.view(BFLOAT16).astype(np.float32).view(np.uint32)  # (layer, token, d_model)
    assert np.array_equal(widened, bits.astype(np.uint32) << 16)
    for layers, shuffle, workers in (([1, 3], True, 0), (None, False, 0), ([0, 2], True, 2), ([2, 0], True, 0)):
        data = ActivationDataset(tmp_path / "special.zarr", layers=layers, batch_size=6, shuffle=shuffle,
                                 buffer_chunks=1)
        index = list(range(4)) if layers is None else layers
        seen = []
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers) if workers else data
        for batch in loader:  # not kept: their buffers go back to the pool
            tokens = batch["token"].numpy()
            got = batch["activations"].numpy().view(np.uint32)
            np.testing.assert_array_equal(got, widened[index][:, tokens].transpose(1, 0, 2))
            batch["activations"].fill_(float("nan"))  # written in place, then dropped: later batches unchanged
            batch["activations"].view(torch.int32)[..., ::3] = -1
            seen += tokens.tolist()
            del batch
        assert sorted(seen) == list(range(170))
    assert len(pools) == 3 and all(pool.allocated < 11 for pool in pools), "buffers written in place were reused"
