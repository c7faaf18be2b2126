"""A block of a sharded (schema 2.0) layered array read in one ranged request: what every analysis reads.

zarr reads a few layers of one shard by fetching each inner chunk with a request of its own, decoding it into a
buffer of the shard's selection and copying that into the output. The inner chunks of consecutive layers lie end
to end in the shard (one inner chunk per layer, in layer order), so here they are fetched with one ranged read
through the array's store, each decoded by the array's own inner codecs (crc32c checked, bounded zstd) and copied
once into the output; on a local store, inner chunks of plain bytes + crc32c are read with one ``readinto`` in the
calling thread and checked and viewed in place. The shard index is read and checked by the registered CheckedShardingCodec and its entries
for these layers checked again against an inner chunk of this array (lengths, overlaps, the end of the shard).
Anything else (several shards, steps, integer keys) is left to zarr.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from depthcache.codecs import CorruptChunkError, index_entries_problem
from depthcache.limits import max_object_bytes

GAP_FACTOR = 1.25  # one read when the chunks' span is at most this much more than their bytes


def layered_block(array: zarr.Array, key: Any) -> np.ndarray | None:
    """``array[key]`` for a key of plain slices inside one shard of a sharded array whose inner chunks are one layer
    each (``(1, shard tokens, …)``), or None when the key or the array is of another kind (zarr reads those)."""
    if not _fits(array, key):
        return None
    dims = array.metadata.dimension_names
    layer_axis, token_axis = dims.index("layer"), dims.index("token")
    slices = [slice(*s.indices(n)) for s, n in zip(key, array.shape)]
    layers = range(slices[layer_axis].start, slices[layer_axis].stop)
    shard_tokens = array.shards[token_axis]
    shard = slices[token_axis].start // shard_tokens
    out_shape = [s.stop - s.start for s in slices]
    out = np.empty(out_shape, dtype=array.dtype)
    if not len(layers) or not math.prod(out_shape):
        return out
    inner = [s if axis not in (layer_axis, token_axis) else slice(None) for axis, s in enumerate(slices)]
    first = shard * shard_tokens
    inner[token_axis] = slice(slices[token_axis].start - first, slices[token_axis].stop - first)
    inner[layer_axis] = 0
    for i, values in enumerate(_decoded_layers(array, layers, shard, token_axis)):
        target = [slice(None)] * len(out_shape)
        target[layer_axis] = i
        out[tuple(target)] = values[tuple(inner)]
    return out


def _fits(array: zarr.Array, key: Any) -> bool:
    """Whether ``key`` is plain slices (step 1) within one shard of a layered array with one-layer inner chunks."""
    dims = array.metadata.dimension_names or ()
    if not array.shards or "layer" not in dims or "token" not in dims or array.chunks[dims.index("layer")] != 1:
        return False
    if not isinstance(key, tuple) or len(key) != array.ndim or not all(isinstance(k, slice) for k in key):
        return False
    if any(k.step not in (None, 1) for k in key):
        return False
    axis = dims.index("token")
    tokens = slice(*key[axis].indices(array.shape[axis]))
    shard = array.shards[axis]
    return tokens.stop > tokens.start and tokens.start // shard == (tokens.stop - 1) // shard \
        and array.chunks[axis] == shard


def _decoded_layers(array: zarr.Array, layers: range, shard: int, token_axis: int) -> list[np.ndarray]:
    """The inner chunks of ``layers`` in shard ``shard``, decoded (each through its crc32c), in layer order."""
    codec = array.metadata.codecs[0]
    per_shard = tuple(s // c for s, c in zip(array.shards, array.chunks))
    coords = ["0"] * array.ndim
    coords[token_axis] = str(shard)
    path = array.store_path / "/".join(["c", *coords])
    index = sync(codec._load_shard_index_maybe(path, per_shard))
    if index is None:
        raise CorruptChunkError(f"{path.path}: the shard is missing")
    shard_spec = array.metadata.get_chunk_spec(tuple(0 for _ in per_shard), array._async_array.config,
                                               default_buffer_prototype())
    chunk_spec = codec._get_chunk_spec(shard_spec)
    limit = max_object_bytes(math.prod(array.chunks) * array.dtype.itemsize)
    problem = index_entries_problem(index.offsets_and_lengths, limit)
    entries = index.offsets_and_lengths.reshape(per_shard[0], -1, 2)[layers.start:layers.stop, 0]
    if problem is None and (entries[:, 0] == np.iinfo(np.uint64).max).any():
        problem = f"inner chunk of layer {layers.start + int(np.argmax(entries[:, 0] == np.iinfo(np.uint64).max))} " \
                  "is missing from its index"
    if problem:
        raise CorruptChunkError(f"{path.path}: the shard index is corrupt: {problem}")
    ranges = [(int(o), int(n)) for o, n in entries]
    local = _local_file(array, path)
    if local is not None and _plain(codec):
        return _read_plain(local, ranges, array.dtype, codec.chunk_shape, path.path, layers)
    pieces = _fetch(path, ranges)
    try:
        decoded = sync(codec.codec_pipeline.decode([(piece, chunk_spec) for piece in pieces]))
    except Exception:  # noqa: BLE001 - name the inner chunk that fails (its checksum, its zstd frame)
        for layer, piece in zip(layers, pieces):
            try:
                sync(codec.codec_pipeline.decode([(piece, chunk_spec)]))
            except Exception as exc:  # noqa: BLE001 - any decode failure of untrusted bytes
                raise CorruptChunkError(f"{path.path}: the inner chunk of layer {layer} fails to decode "
                                        f"({type(exc).__name__}: {str(exc)[:120]})") from exc
        raise
    return [d.as_numpy_array() for d in decoded]


def _local_file(array: zarr.Array, path: Any) -> Path | None:
    """The file of a shard of an array on a local store (None for object storage and other stores)."""
    if not isinstance(array.store, zarr.storage.LocalStore):
        return None
    return Path(array.store.root) / path.path


def _plain(codec: Any) -> bool:
    """Whether inner chunks are stored as little-endian bytes followed by their crc32c, nothing else."""
    names = [c.to_dict() for c in codec.codecs]
    return [c["name"] for c in names] == ["bytes", "crc32c"] and \
        (names[0].get("configuration") or {}).get("endian", "little") == "little"


def _read_plain(file: Path, ranges: list[tuple[int, int]], dtype: np.dtype, shape: tuple[int, ...], label: str,
                layers: range) -> list[np.ndarray]:
    """Inner chunks of a local shard read in one ``readinto`` in the calling thread (so dask's threads read in
    parallel, and no copy is made through zarr's event loop), each checked against its crc32c and viewed as
    values without a copy."""
    start = min(o for o, _ in ranges)
    stop = max(o + n for o, n in ranges)
    if stop - start > GAP_FACTOR * sum(n for _, n in ranges):
        return [_read_plain(file, [r], dtype, shape, label, range(layer, layer + 1))[0]
                for r, layer in zip(ranges, layers)]
    buffer = np.empty(stop - start, dtype=np.uint8)
    with open(file, "rb", buffering=0) as f:
        f.seek(start)
        got = f.readinto(memoryview(buffer))
    if got != stop - start:
        raise CorruptChunkError(f"{label}: the shard index points to bytes {start:,}..{stop:,}, past the end of the "
                                f"shard ({got:,} read)")
    out = []
    for (offset, length), layer in zip(ranges, layers):
        piece = buffer[offset - start:offset - start + length]
        if int.from_bytes(piece[-4:].tobytes(), "little") != google_crc32c.value(piece[:-4]):
            raise CorruptChunkError(f"{label}: the inner chunk of layer {layer} fails its crc32c checksum")
        values = piece[:-4].view(dtype)
        if values.size != math.prod(shape):
            raise CorruptChunkError(f"{label}: the inner chunk of layer {layer} holds {values.size:,} values, not "
                                    f"{math.prod(shape):,}")
        out.append(values.reshape(shape))
    return out


def _fetch(path: Any, ranges: list[tuple[int, int]]) -> list[Any]:
    """The bytes of each (offset, length) of one shard: one read covering them all when they lie close together,
    else one read each; a read past the end of the shard is refused."""
    start = min(o for o, _ in ranges)
    stop = max(o + n for o, n in ranges)
    if stop - start <= GAP_FACTOR * sum(n for _, n in ranges):
        whole = _get(path, start, stop)
        return [whole[o - start:o - start + n] for o, n in ranges]
    return [_get(path, o, o + n) for o, n in ranges]


def _get(path: Any, start: int, stop: int) -> Any:
    """Bytes ``start:stop`` of the object at ``path``, all of them or a CorruptChunkError."""
    data = sync(path.get(prototype=default_buffer_prototype(), byte_range=RangeByteRequest(start, stop)))
    if data is None or len(data) != stop - start:
        raise CorruptChunkError(f"{path.path}: the shard index points to bytes {start:,}..{stop:,}, past the end "
                                f"of the shard ({0 if data is None else len(data):,} read)")
    return data
