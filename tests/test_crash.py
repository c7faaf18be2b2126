"""Crash consistency: an extraction killed at random moments (SIGKILL, SIGINT, SIGTERM) leaves a store that opens,
with progress on a chunk boundary, and resumes bit-identically (a fixed seed of tests/crash_driver.py; CI runs more
seeds with ``python tests/crash_driver.py``)."""

from __future__ import annotations

from conftest import write_documents
from crash_driver import CHUNK, run

from depthcache.extraction.engine import ExtractOptions, extract

SEEDS = [7]  # three interrupts, one of each signal
KILLS = 3


def test_random_interrupts_resume_bit_identically(tiny_models, tmp_path) -> None:
    data = write_documents(tmp_path / "many.jsonl", [8] * 16)  # ~2300 tokens: 72 chunks of 32
    # the reference in-process (the driver's command line, never interrupted): saves one process start
    extract(ExtractOptions(out=str(tmp_path / "reference.zarr"), model=str(tiny_models["llama"]), data=str(data),
                           seq_len=32, batch_size=4, chunk_tokens=CHUNK, max_tokens=None, device="cpu",
                           progress=False))
    assert run(SEEDS, tiny_models["llama"], data, tmp_path, KILLS, fork=True) == []
