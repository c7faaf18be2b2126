"""Extraction speed: plain forward passes vs full extraction vs raw disk bandwidth, measured in one run.

    python benchmarks/extract_bench.py [--tokens 8192] [--model smollm2-135m] [--dir runs/bench]

Prints tokens/s of (a) forward passes with no capture and (b) extraction into a store, the disk's
durable sequential write bandwidth (c), bytes written, compression ratio, peak RSS of each part
(each part runs in its own process), and R = time(b) / (time(a) + bytes_on_disk / disk_bw).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_bandwidth(folder: Path, mib: int = 512) -> float:
    """Durable sequential write bandwidth (MiB/s): write ``mib`` MiB in 8 MiB blocks, fsync, delete."""
    block = np.random.default_rng(0).integers(0, 255, 8 * 2**20, dtype=np.uint8).tobytes()
    path = folder / "bandwidth.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mib // 8):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return mib / seconds


def setup(args: argparse.Namespace, out: str):  # noqa: ANN201 - returns the engine's pieces
    """Load the model and plan the same batches the extraction runs (not timed)."""
    from depthcache.extraction.data import load_documents
    from depthcache.extraction.engine import ExtractOptions, Plan
    from depthcache.extraction.windows import bos_token_id, make_windows, tokenize_documents
    from depthcache.layerspec import parse_layers
    from depthcache.model.architectures import architecture_for, decoder_layers
    from depthcache.model.loading import load_model

    opts = ExtractOptions(out=out, model=args.model, max_tokens=args.tokens, device=args.device,
                          batch_size=args.batch_size, progress=False)
    loaded = load_model(opts.model, device=args.device)
    docs = load_documents(opts.data)
    arch = architecture_for(loaded.model)
    windows = make_windows(tokenize_documents(loaded.tokenizer, docs), opts.seq_len,
                           bos_token_id(loaded.tokenizer), opts.max_tokens)
    plan = Plan(windows, parse_layers("all", len(decoder_layers(loaded.model, arch))))
    return opts, loaded, arch, plan, docs


def part_forward(args: argparse.Namespace) -> dict:
    """(a) The same fixed-shape batches through the model, no hooks, logits only."""
    import torch

    from depthcache.extraction.engine import batch_inputs

    opts, loaded, _, plan, _ = setup(args, "unused")
    pad = loaded.tokenizer.pad_token_id or 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(plan.windows), opts.batch_size):
            ids, mask = batch_inputs(plan.windows[first:first + opts.batch_size], opts.seq_len, pad, args.device)
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().sum().item()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": plan.n_tokens, "peak_rss_mib": peak_rss_mib()}


def part_extract(args: argparse.Namespace) -> dict:
    """(b) The real pipeline (capture, cast, queue, chunk writer, fsync, commits) into a fresh store."""
    from depthcache.extraction.engine import (
        parse_sites,
        prepare_store,
        provenance,
        run_pipeline,
    )
    from depthcache.store.layout import STORED_DTYPES, StoreLayout, choose_chunk_tokens

    out = Path(args.dir) / "bench.zarr"
    shutil.rmtree(out, ignore_errors=True)
    opts, loaded, arch, plan, docs = setup(args, str(out))
    d_model = int(loaded.model.get_output_embeddings().weight.shape[1])
    chunk = choose_chunk_tokens(len(plan.layers), d_model, STORED_DTYPES[opts.dtype].itemsize)
    attrs = provenance(opts, loaded, docs.name, docs.sha256, len(docs.texts), plan, args.device, chunk)
    prepare_store(opts, attrs, StoreLayout(plan.n_tokens, plan.layers, d_model, opts.top_k,
                                           parse_sites(opts.sites), opts.dtype, chunk), loaded)
    model_bytes = sum(f.stat().st_size for f in (out / "model").rglob("*") if f.is_file())
    start = time.perf_counter()
    run_pipeline(opts, attrs, loaded, arch, plan, args.device)
    seconds = time.perf_counter() - start
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) - model_bytes
    raw = sum(a.nbytes for name, a in __import__("zarr").open_group(str(out), mode="r").arrays() if name != "layer")
    return {"seconds": seconds, "tokens": plan.n_tokens, "bytes_on_disk": on_disk, "bytes_raw": raw,
            "chunk_tokens": chunk, "peak_rss_mib": peak_rss_mib()}


def run_part(name: str, argv: list[str]) -> dict:
    """Run one part in a fresh process (its own peak RSS) and parse its JSON line."""
    proc = subprocess.run([sys.executable, __file__, "--part", name, *argv], check=True, capture_output=True,
                          text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default="runs/bench")
    parser.add_argument("--part", choices=["forward", "extract"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(part_forward(args) if args.part == "forward" else part_extract(args)))
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    argv = ["--model", args.model, "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
            "--device", args.device, "--dir", args.dir]
    run_part("forward", argv)  # warm-up: dequantized-model cache, page cache
    fwd = run_part("forward", argv)
    ext = run_part("extract", argv)
    bw = disk_bandwidth(Path(args.dir))
    write_s = ext["bytes_on_disk"] / 2**20 / bw
    r = ext["seconds"] / (fwd["seconds"] + write_s)
    r_overlap = ext["seconds"] / max(fwd["seconds"], write_s)
    rows = [
        ("tokens", f"{ext['tokens']:,}"),
        ("(a) forward only", f"{fwd['tokens'] / fwd['seconds']:,.0f} tok/s  ({fwd['seconds']:.1f} s, "
                             f"peak RSS {fwd['peak_rss_mib']:,.0f} MiB)"),
        ("(b) extraction", f"{ext['tokens'] / ext['seconds']:,.0f} tok/s  ({ext['seconds']:.1f} s, "
                           f"peak RSS {ext['peak_rss_mib']:,.0f} MiB, chunk {ext['chunk_tokens']} tokens)"),
        ("written", f"{ext['bytes_on_disk'] / 2**20:,.0f} MiB on disk = "
                    f"{ext['bytes_on_disk'] / 2**20 / ext['seconds']:,.0f} MiB/s; raw {ext['bytes_raw'] / 2**20:,.0f}"
                    f" MiB (compression ×{ext['bytes_raw'] / ext['bytes_on_disk']:.2f})"),
        ("(c) disk bandwidth", f"{bw:,.0f} MiB/s durable sequential write"),
        ("R", f"{r:.3f}   = time(b) / (time(a) + bytes/disk_bw)"),
        ("R_overlap", f"{r_overlap:.3f}   = time(b) / max(time(a), bytes/disk_bw)"),
    ]
    for key, value in rows:
        print(f"{key:<20} {value}")


if __name__ == "__main__":
    main()
