"""Hostile shard indexes (schema 2.0): an index pointing past the shard, overlapping inner chunks, a length claiming
GiB, a bad index checksum, a truncated index. Each is one line naming the array, the shard and (where the index
names one) the inner chunk, in bounded memory, with nothing written; ``validate`` reads and checks every index.
The indexes are crafted by hand from the sharding codec's specification (Zarr v3 ``sharding_indexed``: per inner
chunk a little-endian uint64 offset and length, 2**64-1 for an absent chunk, then the index's crc32c)."""

from __future__ import annotations

import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hostile import with_crc32c
from test_extract import run
from test_robust import cli, one_error

import depthcache
from depthcache.store.schema import validate

LAYERS = 4  # inner chunks per shard of resid_pre in the tiny models' stores
SHARD = "resid_pre/c/0/1/0"


@pytest.fixture(scope="module")
def store(tiny_models, text_file, tmp_path_factory) -> Path:
    """A small bf16 store of 2.0 shards: resid_pre in shards of 64 tokens x 4 layers."""
    return run(tmp_path_factory.mktemp("shards"), tiny_models["llama"], text_file, dtype="bfloat16", max_tokens=192)


def index_of(shard: bytes) -> np.ndarray:
    """The (inner chunks, 2) offsets and lengths at the end of a shard."""
    return np.frombuffer(shard[-(16 * LAYERS + 4):-4], dtype="<u8").reshape(LAYERS, 2).copy()


def with_index(shard: bytes, entries: np.ndarray) -> bytes:
    """``shard`` with its index replaced by ``entries`` and a valid crc32c (only the checks stop it)."""
    return shard[:-(16 * LAYERS + 4)] + with_crc32c(entries.astype("<u8").tobytes())


def past_the_end(shard: bytes) -> bytes:
    entries = index_of(shard)
    entries[2, 0] = len(shard) + 100
    return with_index(shard, entries)


def overlapping(shard: bytes) -> bytes:
    entries = index_of(shard)
    entries[1] = entries[0]  # inner chunk 1 reads inner chunk 0's bytes: valid crc32c, wrong layer
    return with_index(shard, entries)


def claiming_gib(shard: bytes) -> bytes:
    entries = index_of(shard)
    entries[3, 1] = 3 * 2**30
    return with_index(shard, entries)


def bad_checksum(shard: bytes) -> bytes:
    data = bytearray(shard)
    data[-10] ^= 0x40  # a byte of the index, its crc32c left as it was
    return bytes(data)


def truncated(shard: bytes) -> bytes:
    return shard[:40]  # shorter than its index


CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "past the end": (past_the_end, "inner chunk (2, 0, 0)"),
    "overlapping": (overlapping, "inner chunks (0, 0, 0) and (1, 0, 0) overlap"),
    "claiming GiB": (claiming_gib, "inner chunk (3, 0, 0) claims 3,221,225,472 bytes"),
    "bad checksum": (bad_checksum, "fails its checksum"),
    "truncated": (truncated, "too short for its index"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_shard_indexes_are_one_line_in_bounded_memory(store: Path, tmp_path: Path, case: str) -> None:
    damage, needle = CASES[case]
    copy = Path(shutil.copytree(store, tmp_path / "copy.zarr"))
    shard = copy / SHARD
    shard.write_bytes(damage(shard.read_bytes()))
    found = validate(str(copy))
    assert found.count == 1 and "resid_pre" in found.lines[0] and SHARD in found.lines[0], found.lines
    if case != "truncated":  # a truncated shard fails before its index is read: no inner chunk to name
        assert needle in found.lines[0], found.lines
    ds = depthcache.open(copy)
    tracemalloc.start()
    try:
        with pytest.raises(Exception, match="resid_pre/c/0/1/0|resid_pre"):
            ds.resid_pre.isel(layer=slice(0, LAYERS)).values
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, peak  # the claimed 3 GiB is never allocated or read
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    code, out = cli("analyze", "residual-norms", str(copy), "--results", str(tmp_path / "r"))
    one_error(code, out, "resid_pre", SHARD)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before  # nothing written into the store
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.zarr"))


def test_an_inner_chunk_missing_from_its_index_is_reported(store: Path, tmp_path: Path) -> None:
    """A committed inner chunk marked absent would read as zeros: validate names it."""
    copy = Path(shutil.copytree(store, tmp_path / "copy.zarr"))
    shard = copy / SHARD
    entries = index_of(shard.read_bytes())
    entries[1] = 2**64 - 1
    shard.write_bytes(with_index(shard.read_bytes(), entries))
    found = validate(str(copy))
    assert found.count == 1 and "inner chunk (1, 0, 0) of committed tokens is missing" in found.lines[0], found.lines


def test_index_entries_are_packed_as_the_specification_says(store: Path) -> None:
    """The crafted indexes above follow the real layout: offsets tile the data, lengths are inner chunk + crc32c."""
    shard = (store / SHARD).read_bytes()
    entries = index_of(shard)
    assert entries[0, 0] == 0 and all(entries[i + 1, 0] == entries[i].sum() for i in range(LAYERS - 1))
    assert entries[-1].sum() == len(shard) - (16 * LAYERS + 4)
    assert struct.unpack("<I", shard[-4:])[0] == __import__("google_crc32c").value(shard[-(16 * LAYERS + 4):-4])
