"""Cost of the untrusted-store bounds: zstd decoding bounded by the declared chunk vs zarr's own decoder, and the
checks of an open (one listing) and of a store claiming 2^20 chunks per array.

    python benchmarks/robust_bench.py --tokens 2048 --pairs 3

A synthetic bf16 array with SmolLM2-135M's shapes (30 layers, d_model 576, 512-token chunks, zstd + crc32c, heavy-
tailed values) is read chunk by chunk with zarr's ZstdCodec (A) and depthcache's BoundedZstdCodec (B), interleaved
A B A B; medians and ranges of the time, and the ratio B / A per pair.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

import depthcache  # noqa: F401 - registers bfloat16 and the bounded zstd decoder
from depthcache.codecs import BoundedZstdCodec
from depthcache.dtypes import BFLOAT16

LAYERS, D_MODEL, CHUNK = 30, 576, 512
DEFAULT = f"{ZstdCodec.__module__}.{ZstdCodec.__qualname__}"
BOUNDED = f"{BoundedZstdCodec.__module__}.{BoundedZstdCodec.__qualname__}"


def make_array(folder: Path, tokens: int) -> Path:
    """A (layer, token, d_model) bf16 array of heavy-tailed values, chunked and coded as a store's activations."""
    rng = np.random.default_rng(0)
    array = zarr.create_array(str(folder / "a.zarr"), shape=(LAYERS, tokens, D_MODEL), chunks=(LAYERS, CHUNK, D_MODEL),
                              dtype=BFLOAT16, compressors=[ZstdCodec(level=1), Crc32cCodec()])
    for start in range(0, tokens, CHUNK):
        block = rng.standard_t(3, size=(LAYERS, min(CHUNK, tokens - start), D_MODEL)).astype(np.float32)
        array[:, start:start + block.shape[1]] = block.astype(BFLOAT16)
    return folder / "a.zarr"


def read_all(path: Path, codec: str) -> float:
    """Seconds to decode every chunk with the zstd implementation ``codec``."""
    with zarr.config.set({"codecs.zstd": codec}):
        array = zarr.open_array(str(path), mode="r")
        started = time.perf_counter()
        for start in range(0, array.shape[1], CHUNK):
            array[:, start:start + CHUNK]
        return time.perf_counter() - started


def summary(values: list[float]) -> str:
    """'median (min-max)'."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="robust-bench-"))
    try:
        path = make_array(folder, args.tokens)
        raw = LAYERS * args.tokens * D_MODEL * 2
        read_all(path, DEFAULT)  # warm the page cache
        a, b = [], []
        for _ in range(args.pairs):
            a.append(read_all(path, DEFAULT))
            b.append(read_all(path, BOUNDED))
        ratios = [y / x for x, y in zip(a, b)]
        print(f"decode {raw / 2**20:,.0f} MiB raw bf16 ({args.tokens} tokens, {args.tokens // CHUNK} chunks)")
        print(f"A zarr ZstdCodec        {summary(a)} s  {raw / 2**20 / statistics.median(a):,.0f} MiB/s")
        print(f"B BoundedZstdCodec      {summary(b)} s  {raw / 2**20 / statistics.median(b):,.0f} MiB/s")
        print(f"B / A per pair          {summary(ratios)}")
        print(f"peak RSS                {peak_rss_mib():,.0f} MiB")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
