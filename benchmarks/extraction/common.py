"""What every extraction-benchmark script shares: the same token windows and batches as ``depthcache extract``.

Written with transformers and the standard library only, so the peer scripts run in an environment without
depthcache. Windows: pydoc-topics documents (sorted by key), split into ``seq_len``-token windows that never cross a
document (a BOS first where the tokenizer adds one), cut at ``max_tokens``; batches of ``batch_size`` windows,
right-padded to ``seq_len`` with an attention mask.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def arguments(description: str) -> argparse.Namespace:
    """The options every script takes (the driver passes the same ones to all)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", required=True, help="Hugging Face folder of the model (float32).")
    parser.add_argument("--out", required=True, help="Folder for this script's output files.")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timings", default=None, help="Append this run's timing JSON line to this file.")
    return parser.parse_args()


def token_windows(tokenizer, max_tokens: int, seq_len: int) -> list[list[int]]:  # noqa: ANN001 - HF tokenizer
    """Token ids of each window, tokenizing documents only until ``max_tokens`` tokens are covered."""
    from pydoc_data.topics import topics

    ids = tokenizer("a")["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id \
        else []
    body = seq_len - len(bos)
    windows: list[list[int]] = []
    total = 0
    for key in sorted(topics):
        doc = tokenizer(topics[key], add_special_tokens=False)["input_ids"]
        for start in range(0, len(doc), body):
            tokens = bos + doc[start:start + body]
            if total + len(tokens) >= max_tokens:
                if max_tokens > total:
                    windows.append(tokens[:max_tokens - total])
                return windows
            windows.append(tokens)
            total += len(tokens)
    return windows


def batches(windows: list[list[int]], batch_size: int, seq_len: int, pad_id: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, attention mask) of each batch, right-padded to (batch_size or fewer, seq_len)."""
    for first in range(0, len(windows), batch_size):
        group = windows[first:first + batch_size]
        ids = torch.full((len(group), seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), seq_len), dtype=torch.long)
        for row, tokens in enumerate(group):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        yield ids, mask


def pad_id(tokenizer) -> int:  # noqa: ANN001 - HF tokenizer
    """The pad id depthcache uses (the tokenizer's, else 0)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def fresh_folder(path: str) -> Path:
    """An empty output folder (earlier runs' files removed)."""
    import shutil

    folder = Path(path)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def process_seconds() -> float:
    """Seconds since this process started (the kernel's start time, 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


class Clock:
    """Marks when the first batch starts and when the work ends; writes both as one JSON line."""

    def __init__(self) -> None:
        self.first_batch: float | None = None
        self.first_batch_since_start: float | None = None

    def start(self) -> None:
        """Call just before the first forward pass (the model is loaded, the inputs are made)."""
        if self.first_batch is None:
            self.first_batch, self.first_batch_since_start = time.perf_counter(), process_seconds()

    def write(self, path: str | None, name: str, tokens: int) -> None:
        """Append {name, tokens, time to first batch, seconds after the first batch started} to ``path``."""
        if path is None or self.first_batch is None:
            return
        line = {"tool": name, "tokens": tokens, "to_first_batch_s": self.first_batch_since_start,
                "after_load_s": time.perf_counter() - self.first_batch}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
