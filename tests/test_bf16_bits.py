"""bf16 written as its bit pattern (no ml_dtypes): every byte of a store is what zarr's ml_dtypes path writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_startup import cli_modules

from depthcache import dtypes
from depthcache.extraction import engine
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.extraction.writer import ChunkWriter, along, fsync_chunk, object_file, token_axis
from depthcache.store import layout as layout_module
from depthcache.store.layout import StoreLayout, create_arrays

CASES = [("bfloat16", None), ("bfloat16", 3), ("float32", None), ("float16", None)]


class ZarrCastWriter(ChunkWriter):
    """The writer as it was before the bit-pattern path: arrays opened by zarr (bf16 as ml_dtypes' bfloat16) and
    each chunk handed to zarr as a bf16 array; the reference the new path must equal byte for byte."""

    def __init__(self, group: zarr.Group, *args, **kwargs) -> None:
        super().__init__(group, *args, **kwargs)
        self.zarr_arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in self.arrays}

    def _write(self, name: str, stop: int) -> None:
        array, buffer = self.zarr_arrays[name], self.buffers[name]
        if buffer.dtype == np.uint16:
            buffer = buffer.view(dtypes.bfloat16())
        axis = token_axis(array)
        array[along(axis, array.ndim, self.chunk_start, stop)] = buffer[along(axis, array.ndim, 0, self.filled)]
        if self.folder is not None:
            fsync_chunk(self.folder / name, object_file(array, self.chunk_start))


def create_as_before(patch: pytest.MonkeyPatch) -> None:
    """``create_arrays`` as before: bf16 arrays created from ml_dtypes' numpy dtype (zarr infers BFloat16)."""
    patch.setattr(layout_module, "BFloat16Bits", dtypes.bfloat16)


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root``: relative path → bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def batches(dtype: str, n_layers: int, n_tokens: int, d_model: int, seed: int = 0) -> list[tuple[int, dict]]:
    """Batches of every activation array (bf16: all 65,536 bit patterns, NaN payloads and subnormals included) and
    the per-token arrays, in uneven sizes."""
    rng = np.random.default_rng(seed)
    sizes, at, out = [7, 30, 1, 25, 40, 9], 0, []
    for size in sizes:
        size = min(size, n_tokens - at)
        if size <= 0:
            break
        batch: dict[str, np.ndarray] = {}
        for name, shape in (("resid_pre", (n_layers, size, d_model)), ("resid_final", (size, d_model))):
            if dtype == "bfloat16":
                batch[name] = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
            else:
                batch[name] = rng.standard_normal(shape).astype(dtype)
        batch["token_id"] = rng.integers(0, 1000, size, dtype=np.int32)
        out.append((at, batch))
        at += size
    return out


def write_store(group: zarr.Group, dtype: str, zstd: int | None, writer: type[ChunkWriter]) -> None:
    """A store of 112 tokens in chunks of 32 (the last one short, so filled with the fill value) written by
    ``writer``; sharded (schema 2.0): resid_final and token_id in shards of two chunks, each written in two parts."""
    n_layers, n_tokens, d_model, chunk = 3, 112, 24, 32
    layout = StoreLayout(n_tokens, tuple(range(n_layers)), d_model, 5, ("resid",), dtype, chunk, zstd_level=zstd,
                         token_shard_tokens=2 * chunk)
    create_arrays(group, layout)
    names = ["resid_pre", "resid_final", "token_id"]
    w = writer(group, names, chunk, n_tokens, 0, lambda stop: None)
    for at, batch in batches(dtype, n_layers, n_tokens, d_model):
        w.append(batch, at)
    w.finish()
    w.close()


@pytest.mark.parametrize(("dtype", "zstd"), CASES)
def test_bit_pattern_writer_writes_the_same_bytes_as_zarrs_bf16(dtype, zstd, tmp_path, monkeypatch) -> None:
    """Metadata and every chunk file, written by the writer and by zarr from ml_dtypes bf16 values, are identical."""
    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    write_store(zarr.open_group(str(new), mode="w", zarr_format=3), dtype, zstd, ChunkWriter)
    with monkeypatch.context() as patch:
        create_as_before(patch)
        write_store(zarr.open_group(str(old), mode="w", zarr_format=3), dtype, zstd, ZarrCastWriter)
    got, want = files(new), files(old)
    assert got.keys() == want.keys() and any(k.startswith("resid_pre/c/") for k in got)
    for key in want:
        assert got[key] == want[key], key
    if dtype == "bfloat16":
        assert json.loads(got["resid_pre/zarr.json"])["data_type"] == "bfloat16"
        values = zarr.open_group(str(new), mode="r")["resid_pre"][...]
        assert values.dtype == dtypes.bfloat16()  # read back through the registered type, as before


@pytest.mark.parametrize("url", ["memory", "fsspec"])
def test_bit_pattern_writer_on_remote_stores(url, tmp_path, monkeypatch) -> None:
    """Stores that are not local folders (zarr's memory store, an fsspec filesystem) get the same bytes too."""
    def group_at(name: str) -> zarr.Group:
        if url == "memory":
            return zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
        return zarr.open_group(f"memory://{tmp_path.name}/{name}", mode="w", zarr_format=3)

    def contents(group: zarr.Group) -> dict[str, bytes]:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        async def read() -> dict[str, bytes]:
            keys = [k async for k in group.store.list()]
            return {k: (await group.store.get(k, prototype=default_buffer_prototype())).to_bytes() for k in keys}
        return sync(read())

    new = group_at("new")
    write_store(new, "bfloat16", 3, ChunkWriter)
    with monkeypatch.context() as patch:
        create_as_before(patch)
        old = group_at("old")
        write_store(old, "bfloat16", 3, ZarrCastWriter)
    got, want = contents(new), contents(old)
    assert got.keys() == want.keys() and any("/c/" in k for k in got)
    assert got == want


def test_writer_refuses_float_values_for_a_bf16_array(tmp_path) -> None:
    """A bf16 array takes bit patterns (or ml_dtypes bf16 viewed as bits), never floats cast by value."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    create_arrays(group, StoreLayout(32, (0,), 4, 2, ("resid",), "bfloat16", 32))
    writer = ChunkWriter(group, ["resid_final", "token_id"], 32, 32, 0, lambda stop: None)
    with pytest.raises(TypeError, match="bit patterns"):
        writer.append({"resid_final": np.ones((32, 4), np.float32), "token_id": np.zeros(32, np.int32)}, 0)
    values = np.linspace(-3, 3, 128, dtype=np.float32).reshape(32, 4).astype(dtypes.bfloat16())
    writer.append({"resid_final": values, "token_id": np.zeros(32, np.int32)}, 0)
    writer.close()
    assert np.array_equal(group["resid_final"][...].view(np.uint16), values.view(np.uint16))


def test_fill_value_bits_match_ml_dtypes() -> None:
    """JSON fill values round to the bf16 ml_dtypes would make, and go back to the same JSON."""
    bits = dtypes.BFloat16Bits()
    for value in (0.0, -0.0, 1.0, 1.00390625, 1.0039062509313226, -2.5e-40, 3.39e38, 1e39, float("inf"), "NaN",
                  "-Infinity"):
        number = float(value)
        want = dtypes.bfloat16().type(number)
        got = bits.from_json_scalar(value, zarr_format=3)
        assert got.dtype == np.uint16
        assert got == np.array(want).view(np.uint16) or (np.isnan(number) and np.isnan(want))
        assert bits.to_json_scalar(got, zarr_format=3) == dtypes.BFloat16().to_json_scalar(want, zarr_format=3)


@pytest.mark.parametrize(("dtype", "zstd"), [("bfloat16", None), ("bfloat16", 3), ("float32", None)])
def test_extraction_writes_the_stores_zarrs_bf16_path_wrote(dtype, zstd, tiny_models, text_file, tmp_path,
                                                            monkeypatch) -> None:
    """A tiny model's extraction: every file of the store equals the one written through ml_dtypes (the root's
    creation time aside)."""
    opts = dict(model=str(tiny_models["llama"]), data=str(text_file), dtype=dtype, seq_len=32, batch_size=3,
                chunk_tokens=64, progress=False, device="cpu", zstd_level=zstd)
    extract(ExtractOptions(out=str(tmp_path / "new.zarr"), **opts))
    with monkeypatch.context() as patch:
        create_as_before(patch)
        patch.setattr(engine, "ChunkWriter", ZarrCastWriter)
        extract(ExtractOptions(out=str(tmp_path / "old.zarr"), **opts))
    got, want = files(tmp_path / "new.zarr"), files(tmp_path / "old.zarr")
    assert got.keys() == want.keys()
    for key in want:
        if key == "zarr.json":
            a, b = json.loads(got[key]), json.loads(want[key])
            a["attributes"]["depthcache"].pop("created"), b["attributes"]["depthcache"].pop("created")
            assert a == b
        else:
            assert got[key] == want[key], key


def test_bf16_extract_command_never_imports_ml_dtypes(tiny_models, text_file, tmp_path) -> None:
    """`depthcache extract` of a bf16 store, then a --resume of a store whose last chunks are not committed, run as
    the command line runs them: ml_dtypes is never imported (its import alone costs seconds)."""
    store = tmp_path / "s.zarr"
    args = ["extract", "--model", str(tiny_models["llama"]), "--data", str(text_file), "--out", str(store),
            "--seq-len", "32", "--batch-size", "3", "--chunk-tokens", "32", "--device", "cpu", "--no-progress"]
    modules = cli_modules(args)
    assert "depthcache.extraction.writer" in modules
    assert "ml_dtypes" not in modules
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["depthcache"]["progress"] = {"tokens_committed": 32, "complete": False}
    (store / "zarr.json").write_text(json.dumps(meta))
    assert "ml_dtypes" not in cli_modules([*args, "--resume"])
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]
    assert attrs["progress"]["complete"] and attrs["options"]["dtype"] == "bfloat16"
    code = (f"import depthcache, zarr\na = zarr.open_group({str(store)!r})['resid_pre'][...]\n"
            "print(a.dtype, bool((a.view('uint16') != 0).any()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["bfloat16", "True"]


def test_widening_bits_equals_ml_dtypes_cast_for_every_pattern() -> None:
    """bf16_bits_to_float32 (what analyses read) gives, for all 65,536 bit patterns, the float32 bits of ml_dtypes'
    cast (NaNs keep their payload, signed zeros and infinities their sign)."""
    import ml_dtypes

    from depthcache.dtypes import bf16_bits_to_float32

    bits = np.arange(2**16, dtype=np.uint16)
    expected = bits.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32)
    assert np.array_equal(bf16_bits_to_float32(bits).view(np.uint32), expected)
    assert bf16_bits_to_float32(np.asarray(np.uint16(0x3F80)))[()] == 1.0
