"""Hostile store contents for tests: zstd decompression bombs (in chunks and inside shards), deeply nested and
oversized metadata, claimed chunk counts. Crafted by hand from the formats' specifications (zstd frames: RFC 8878; chunks end with a crc32c)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import google_crc32c

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_BLOCK = 1 << 17  # a zstd block holds at most 128 KiB


def rle_frame(total: int, declared: int | None, byte: int = 7) -> bytes:
    """A zstd frame of RLE blocks decompressing to ``total`` copies of ``byte`` (4 bytes per 128 KiB: 2 GiB in 64 KB),
    declaring ``declared`` bytes in its header (None: no content size)."""
    window = bytes([0x38])  # window descriptor: 2**(10 + 7) = 128 KiB
    header = ZSTD_MAGIC + (bytes([0x00]) + window if declared is None
                           else bytes([0xC0]) + window + struct.pack("<Q", declared))
    blocks, left = [], total
    while left > 0:
        size = min(left, MAX_BLOCK)
        left -= size
        blocks.append(((size << 3) | (1 << 1) | int(left == 0)).to_bytes(3, "little") + bytes([byte]))
    return header + b"".join(blocks)


def with_crc32c(data: bytes) -> bytes:
    """``data`` followed by its crc32c, as the crc32c codec writes it (a valid checksum)."""
    return data + struct.pack("<I", google_crc32c.value(data))


def plant_bomb(chunk: Path, total: int, declared: int | None) -> None:
    """Replace a chunk object by a decompression bomb with a valid checksum."""
    chunk.write_bytes(with_crc32c(rle_frame(total, declared)))


def plant_bomb_in_shard(shard: Path, inner: int, n_inner: int, total: int, declared: int | None) -> None:
    """Replace inner chunk ``inner`` of a (schema 2.0) shard by a decompression bomb with a valid crc32c and rewrite
    the index (offsets, lengths and its own crc32c) to point at it: only the readers' bounds stop it."""
    data = shard.read_bytes()
    index_bytes = 16 * n_inner + 4
    entries = [struct.unpack_from("<QQ", data, len(data) - index_bytes + 16 * i) for i in range(n_inner)]
    chunks = [data[offset:offset + length] for offset, length in entries]
    chunks[inner] = with_crc32c(rle_frame(total, declared))
    offsets = [sum(len(c) for c in chunks[:i]) for i in range(n_inner)]
    index = b"".join(struct.pack("<QQ", o, len(c)) for o, c in zip(offsets, chunks))
    shard.write_bytes(b"".join(chunks) + with_crc32c(index))


def nested_json(depth: int) -> str:
    """A JSON document nested ``depth`` lists deep."""
    return "[" * depth + "]" * depth


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to a zarr.json in place."""
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def claim_chunks(store: Path, n_chunks: int) -> None:
    """Make a store's metadata consistently claim ``n_chunks`` committed chunks per array (that do not exist)."""
    root = json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]
    tokens = n_chunks * root["layout"]["chunk_tokens"]

    def claim(meta: dict) -> None:
        attrs = meta["attributes"]["depthcache"]
        attrs["layout"]["n_tokens"] = tokens
        attrs["progress"]["tokens_committed"] = tokens
    edit_json(store / "zarr.json", claim)
    for array in store.glob("*/zarr.json"):
        meta = json.loads(array.read_text())
        if meta.get("node_type") == "array" and "token" in (meta.get("dimension_names") or ()):
            axis = meta["dimension_names"].index("token")
            edit_json(array, lambda m, a=axis: m["shape"].__setitem__(a, tokens))
