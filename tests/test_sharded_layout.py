"""Schema 2.0's sharded layout: one layer (or one chunk of it) is read without the other layers' bytes, counted by
the kernel (``rchar`` of /proc/self/io: every byte a read system call returned, page cache or not); every array has
at most one object per 128 MiB (+ its zarr.json) at any model size; shards are written whole and checksummed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import write_documents

import depthcache
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.store.layout import (
    ARRAYS,
    DEFAULT_SHARD_MIB,
    MIB,
    TOKEN_SHARD_BYTES,
    choose_chunk_tokens,
    choose_token_shard_tokens,
)
from depthcache.torch import ActivationDataset

LAYERS, CHUNK = 4, 256  # the tiny models' depth; tokens per shard (64 KiB per layer: a read overshoots by <= 8 KiB)


def read_bytes() -> int:
    """Bytes this process has read through system calls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def bytes_read_by(read) -> tuple[int, np.ndarray]:
    """(bytes read, the values) of one call, after a warm-up call (imports and metadata reads are not counted)."""
    read()
    before = read_bytes()
    values = np.asarray(read())
    return read_bytes() - before, values


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory) -> Path:
    """A float32 store of 4 layers x 64 wide over 2,048 tokens in 256-token shards."""
    folder = tmp_path_factory.mktemp("sharded")
    data = write_documents(folder / "docs.jsonl", [30] * 24)
    out = folder / "s.zarr"
    extract(ExtractOptions(out=str(out), model=str(tiny_models["llama"]), data=str(data), dtype="float32",
                           seq_len=64, batch_size=4, chunk_tokens=CHUNK, max_tokens=2048, progress=False,
                           device="cpu"))
    return out


def test_one_layer_reads_its_own_bytes(store: Path) -> None:
    ds = depthcache.open(store)
    full = ds.resid_pre.values
    used, values = bytes_read_by(lambda: ds.resid_pre.isel(layer=2).values)
    np.testing.assert_array_equal(values, full[2])
    assert values.nbytes * 0.99 < used <= 1.25 * values.nbytes, used / values.nbytes
    # the same through xarray's engine and over a whole-chunk token range of one layer
    xds = xr.open_dataset(store, engine="depthcache")
    used, values = bytes_read_by(lambda: xds.attn_out.isel(layer=1).values)
    assert used <= 1.25 * values.nbytes, used / values.nbytes
    used, values = bytes_read_by(lambda: ds.mlp_out.isel(layer=3, token=slice(2 * CHUNK, 5 * CHUNK)).values)
    np.testing.assert_array_equal(values, ds.mlp_out.values[3, 2 * CHUNK:5 * CHUNK])
    assert used <= 1.25 * values.nbytes, used / values.nbytes
    # all layers read the whole shards: the bound above is not met by reading everything
    used, values = bytes_read_by(lambda: ds.resid_pre.values)
    assert used >= values.nbytes


def test_activation_dataset_reads_one_layer_alone(store: Path) -> None:
    rows = lambda: np.concatenate([b["activations"].numpy() for b in  # noqa: E731
                                   ActivationDataset(store, site="resid_pre", layers=[3], batch_size=100)])
    used, values = bytes_read_by(rows)
    np.testing.assert_array_equal(values[:, 0], depthcache.open(store).resid_pre.values[3])
    assert used <= 1.25 * values.nbytes, used / values.nbytes


def test_logit_lens_on_chosen_layers_reads_those_layers(store: Path) -> None:
    from depthcache.analyze.logit_lens import logit_lens
    from depthcache.store.reader import Store

    whole = logit_lens(Store(str(store)))
    part = logit_lens(Store(str(store)), layers="1")
    np.testing.assert_allclose(part.kl_mean.sel(layer=1), whole.kl_mean.sel(layer=1), rtol=1e-12)
    assert list(part.layer.values) == [1, LAYERS]
    layer_bytes = depthcache.open(store).resid_pre.isel(layer=1).nbytes
    final_bytes = depthcache.open(store).resid_final.nbytes
    used, _ = bytes_read_by(lambda: logit_lens(Store(str(store)), layers="1").kl_mean.values)
    assert used <= 1.25 * (layer_bytes + final_bytes) + 2 * MIB, used / (layer_bytes + final_bytes)


def test_arrays_are_sharded_checksummed_and_few(store: Path) -> None:
    for name in ("resid_pre", "attn_out", "mlp_out", "resid_final", "token_id", "topk_ids"):
        meta = json.loads((store / name / "zarr.json").read_text())
        sharding = meta["codecs"][0]
        assert sharding["name"] == "sharding_indexed", name
        assert sharding["configuration"]["codecs"][-1]["name"] == "crc32c"
        assert sharding["configuration"]["index_codecs"][-1]["name"] == "crc32c"
        if "layer" in ARRAYS[name].dims:  # one inner chunk per layer, one shard per chunk of tokens
            assert sharding["configuration"]["chunk_shape"][:2] == [1, CHUNK]
            assert meta["chunk_grid"]["configuration"]["chunk_shape"][:2] == [LAYERS, CHUNK]
        objects = [p for p in (store / name).rglob("*") if p.is_file()]
        n_tokens = meta["shape"][ARRAYS[name].dims.index("token")]
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"][ARRAYS[name].dims.index("token")]
        assert len(objects) == math.ceil(n_tokens / shard) + 1  # the shards and zarr.json, nothing else
    assert not list(store.rglob("*.partial"))


@pytest.mark.parametrize("n_layers,d_model,itemsize", [(30, 576, 2), (80, 8192, 2), (126, 16384, 2), (2, 64, 4),
                                                       (24, 896, 4), (1, 128, 2)])
@pytest.mark.parametrize("n_tokens", [10**3, 10**5, 10**7])
def test_objects_per_array_at_any_model_size(n_layers: int, d_model: int, itemsize: int, n_tokens: int) -> None:
    """The default shard of the layered arrays and the token shards of the others hold >= 128 MiB, or the array
    fits in one object: at most ceil(array bytes / 128 MiB) + 1 objects (the +1: zarr.json)."""
    chunk = choose_chunk_tokens(n_layers, d_model, itemsize, n_tokens, DEFAULT_SHARD_MIB * MIB)
    token_shard = choose_token_shard_tokens(chunk, d_model, itemsize, n_tokens)
    layered = n_layers * n_tokens * d_model * itemsize
    assert math.ceil(n_tokens / chunk) + 1 <= math.ceil(layered / (128 * MIB)) + 1
    final = n_tokens * d_model * itemsize
    assert math.ceil(n_tokens / token_shard) + 1 <= math.ceil(final / (128 * MIB)) + 1
    assert chunk * n_layers * d_model * itemsize <= DEFAULT_SHARD_MIB * MIB or chunk == 16
    assert token_shard % chunk == 0 and token_shard * d_model * itemsize <= TOKEN_SHARD_BYTES + chunk * d_model * 4


def test_shards_are_written_once_and_whole(store: Path, tmp_path: Path) -> None:
    """Every shard of a layered array is the same size (one write of a whole shard; float32 does not compress)
    and every inner chunk of every committed shard is listed in its checked index (validate reads them all)."""
    sizes = {p.stat().st_size for p in (store / "resid_pre" / "c").rglob("*") if p.is_file()}
    n_tokens = depthcache.open(store).sizes["token"]
    assert len(sizes) == (1 if n_tokens % CHUNK == 0 else 2)
    from depthcache.store.schema import validate

    found = validate(str(store))
    assert not found, found.report()
    shards = sum(math.ceil(n_tokens / CHUNK) for _ in ("resid_pre", "attn_out", "mlp_out"))
    assert found.read["shard indexes (crc32c)"] >= shards


@pytest.mark.parametrize("key", [(slice(0, 4), slice(0, CHUNK), slice(None)),
                                 (slice(1, 3), slice(CHUNK, 2 * CHUNK), slice(None)),
                                 (slice(2, 3), slice(3 * CHUNK + 5, 4 * CHUNK - 7), slice(3, 40)),
                                 (slice(None), slice(7 * CHUNK, None), slice(None))])
def test_one_read_per_shard_gives_zarrs_values(store: Path, key: tuple) -> None:
    """The analyses' block reader (one ranged read of a shard's consecutive inner chunks) returns exactly what zarr
    returns, for whole and partial blocks; keys across shards or with steps are left to zarr."""
    import zarr

    from depthcache.store.shard_read import layered_block

    array = zarr.open_array(str(store / "resid_pre"), mode="r")
    np.testing.assert_array_equal(layered_block(array, key), array[key])
    assert layered_block(array, (slice(None), slice(CHUNK - 1, CHUNK + 1), slice(None))) is None
    assert layered_block(array, (slice(None, None, 2), slice(0, CHUNK), slice(None))) is None


@pytest.mark.parametrize("spec, layers", [("1,3", [1, 3]), ("0-1,3", [0, 1, 3])])
def test_scattered_layers_read_only_themselves(store: Path, spec: str, layers: list[int]) -> None:
    """Layers that are not consecutive are read run by run (a list of layers would read whole blocks)."""
    from depthcache.analyze.layer_map import layer_map
    from depthcache.analyze.logit_lens import logit_lens
    from depthcache.store.reader import Store

    ds = depthcache.open(store)
    wanted = sum(ds.resid_pre.isel(layer=layer).nbytes for layer in layers) + ds.resid_final.nbytes
    part = logit_lens(Store(str(store)), layers=spec)
    np.testing.assert_allclose(part.kl_mean.sel(layer=layers), logit_lens(Store(str(store))).kl_mean.sel(layer=layers),
                               rtol=1e-12)
    used, _ = bytes_read_by(lambda: logit_lens(Store(str(store)), layers=spec).kl_mean.values)
    assert used <= 1.25 * wanted + 2 * MIB, used / wanted
    pre = sum(ds.resid_pre.isel(layer=layer).nbytes for layer in layers)
    used, _ = bytes_read_by(lambda: layer_map(Store(str(store)), Store(str(store)), shallow_layers=spec,
                                              deep_layers=spec).r2.values)
    assert used <= 2 * 1.25 * pre + 2 * MIB, used / pre  # both sides of the self pair, and the split's metadata


def test_analyses_do_not_depend_on_how_layers_are_blocked(store: Path, tiny_models, monkeypatch) -> None:
    """A 2.0 store is read in blocks of a few layers (all of them only when they fit 128 MiB): every analysis gives
    the same numbers with one layer per block as with all layers in one."""
    from depthcache.analyze import run
    from depthcache.extraction.skip_runs import SkipOptions, extract_skips
    from depthcache.store import reader

    if not depthcache.open(store).attrs["runs"]:
        extract_skips(ExtractOptions(out=str(store), model=str(tiny_models["llama"]),
                                     data=str(store.parent / "docs.jsonl"), dtype="float32",
                                     seq_len=64, batch_size=4, chunk_tokens=CHUNK, max_tokens=2048, progress=False,
                                     device="cpu", resume=True), SkipOptions("1", tokens=2 * CHUNK))
    names = {"contributions": {}, "logit-lens": {}, "residual-norms": {}, "skip-effects": {},
             "layer-map": {"dtype": "float64"}}
    whole = {name: run(name, *[str(store)] * (2 if name == "layer-map" else 1), force=True, **params)
             for name, params in names.items()}
    monkeypatch.setattr(reader, "BLOCK_BYTES", 1)  # one layer per dask block
    assert depthcache.open(store).resid_pre.data.chunks[0] == (1,) * LAYERS
    for name, params in names.items():
        split = run(name, *[str(store)] * (2 if name == "layer-map" else 1), force=True, **params)
        for var in whole[name].data_vars:
            np.testing.assert_allclose(split[var].values, whole[name][var].values, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name} {var}")


def test_resume_refuses_other_chunks(store: Path, tiny_models) -> None:
    """A store's chunks are fixed when it is created: --chunk-tokens or --shard-mib giving others is refused."""
    from depthcache.errors import DepthcacheError

    options = dict(out=str(store), model=str(tiny_models["llama"]), data=str(store.parent / "docs.jsonl"),
                   dtype="float32", seq_len=64, batch_size=4, max_tokens=2048, progress=False, device="cpu",
                   resume=True)
    with pytest.raises(DepthcacheError, match="--chunk-tokens gives 128-token chunks, the store has 256"):
        extract(ExtractOptions(chunk_tokens=CHUNK // 2, **options))
    with pytest.raises(DepthcacheError, match="--shard-mib gives"):
        extract(ExtractOptions(shard_mib=1, **options))
    assert extract(ExtractOptions(chunk_tokens=CHUNK, **options))["progress"]["complete"]
