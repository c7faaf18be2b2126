"""Extraction on CUDA against its floor, in one process: a plain forward pass, the disk, and nnsight.

    python benchmarks/gpu_bench.py --model smollm2-135m [--tokens 65536] [--batch-size 32] [--seq-len 512]
        [--pairs 3] [--device-map auto --max-memory cuda:0=70GiB,cuda:1=70GiB] [--dir /scratch/gpu-bench]

The model is loaded once (bfloat16 unless --model-dtype says otherwise, placed as the options say) and the same
batches run, A B A B for ``--pairs`` pairs: a plain forward pass (inference mode, nothing captured), and
``depthcache extract`` of every layer's resid/attn/mlp (bf16 stored) into a fresh store under ``--dir``. The disk's
write bandwidth is measured there first (1 GiB written and fsynced). Printed: the ratio extraction ÷ max(plain
forward, stored bytes ÷ disk bandwidth), pair by pair (the goal is ≤ 1.15), tokens/s of each, nnsight's tokens/s
(one trace per batch saving the same sites to host memory; skipped with a note where nnsight is not installed:
``pip install -r benchmarks/requirements-peers.txt``), and the peak GPU memory of each phase. Without CUDA it
refuses unless --allow-cpu (a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from depthcache.extraction.data import load_documents
from depthcache.extraction.engine import ExtractOptions, extract, make_plan
from depthcache.extraction.preflight import load_fitted
from depthcache.model import LoadedModel, Placement, main_device, placed_attrs, structure_of

GIB = 2**30


def disk_bandwidth(folder: Path, size: int = GIB) -> float:
    """Bytes per second of writing ``size`` bytes to ``folder`` and fsyncing them (the store's disk)."""
    path = folder / "bandwidth.bin"
    block = os.urandom(16 * 2**20)
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return size / seconds


def synchronized(run: Callable[[], object], device: str) -> float:
    """Wall seconds of ``run``, with the GPU's queued work finished before and after; peak memory reset first."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_gib(device: str) -> float:
    """Peak GPU memory allocated on every GPU since the last reset (0 on CPU)."""
    if not device.startswith("cuda"):
        return 0.0
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / GIB


def batches(loaded: LoadedModel, opts: ExtractOptions, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (ids, mask) batches extraction runs, on the input device: the same windows, padded the same way."""
    from depthcache.extraction.engine import batch_inputs

    plan = make_plan(opts, loaded, load_documents(opts.data, opts.fields), structure_of(loaded.model).n_layers)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    return [batch_inputs(plan.windows[i:i + opts.batch_size], opts.seq_len, pad, device)
            for i in range(0, len(plan.windows), opts.batch_size)]


def plain_forward(model: torch.nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The floor: every batch forward, nothing captured."""
    with torch.inference_mode():
        for ids, mask in inputs:
            model(input_ids=ids, attention_mask=mask, use_cache=False)


def nnsight_run(loaded: LoadedModel, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None] | None:
    """nnsight's trace of the same batches saving every layer's input, attention and MLP output to host memory;
    None where nnsight is not installed."""
    try:
        import nnsight
        from nnsight import LanguageModel
    except ImportError:
        return None
    wrapped = LanguageModel(loaded.model, tokenizer=loaded.tokenizer)
    structure = structure_of(loaded.model)

    def run() -> None:
        with torch.inference_mode():
            for ids, mask in inputs:
                with wrapped.trace({"input_ids": ids, "attention_mask": mask}, use_cache=False):
                    saved = []
                    for i, layer in enumerate(path(wrapped, structure.layers)):
                        saved.append(nnsight.save([layer.input, path(layer, structure.attn[i]).output[0],
                                                   path(layer, structure.mlp[i]).output]))
                [[t.to("cpu", torch.bfloat16) for t in group] for group in saved]
    return run


def path(root: object, dotted: str) -> object:
    """``root.a.b`` for ``'a.b'`` (nnsight's module proxies have no get_submodule)."""
    return functools.reduce(getattr, dotted.split("."), root) if dotted else root


def spread(values: list[float]) -> str:
    """Median (min-max)."""
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="pydoc-topics")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--device-map", default=None)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--model-dtype", default=None)
    parser.add_argument("--dir", default="/tmp/gpu-bench")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a smoke test, not a measurement)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("gpu_bench measures the CUDA path and this machine has no CUDA device (--allow-cpu: a smoke "
                         "test of the script)")
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    placement = Placement(device_map=args.device_map, max_memory=args.max_memory, model_dtype=args.model_dtype)
    loaded = load_fitted(args.model, args.device, placement, progress=False)
    device = main_device(loaded.model)
    common = dict(model=args.model, data=args.data, max_tokens=args.tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, dtype="bfloat16", device=device, progress=False, placement=placement)
    inputs = batches(loaded, ExtractOptions(out=str(work / "plan.zarr"), **common), device)
    tokens = sum(int(mask.sum()) for _, mask in inputs)
    bandwidth = disk_bandwidth(work)
    structure = structure_of(loaded.model)
    d_model = int(loaded.model.get_output_embeddings().weight.shape[1])
    stored = tokens * (3 * structure.n_layers + 1) * d_model * 2
    floor_disk = stored / bandwidth
    nnsight = nnsight_run(loaded, inputs)
    timings: dict[str, list[float]] = {"forward": [], "extract": [], "nnsight": []}
    memory: dict[str, float] = {}
    for pair in range(args.pairs):
        timings["forward"].append(synchronized(lambda: plain_forward(loaded.model, inputs), device))
        memory["forward"] = peak_gib(device)
        out = work / f"extract-{pair}.zarr"
        timings["extract"].append(synchronized(lambda: extract(ExtractOptions(out=str(out), **common), loaded),
                                               device))
        memory["extract"] = peak_gib(device)
        shutil.rmtree(out)
        if nnsight is not None:
            timings["nnsight"].append(synchronized(nnsight, device))
            memory["nnsight"] = peak_gib(device)
    ratios = [e / max(f, floor_disk) for f, e in zip(timings["forward"], timings["extract"])]
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke test)"
    print(f"{name} x{max(torch.cuda.device_count(), 1)}; model {args.model} in "
          f"{str(next(loaded.model.parameters()).dtype).removeprefix('torch.')}, placement "
          f"{placed_attrs(loaded.model)}; {tokens:,} tokens, batch {args.batch_size} x {args.seq_len}, all sites, "
          f"{structure.n_layers} layers, {stored / GIB:.2f} GiB stored (bf16); disk {bandwidth / GIB:.2f} GiB/s "
          f"({floor_disk:.2f} s for the store); {args.pairs} pairs")
    print(f"extraction / max(forward, bytes / disk bandwidth): {spread(ratios)} (goal <= 1.15)")
    for kind, seconds in timings.items():
        if seconds:
            print(f"{kind:8} tokens/s {spread([tokens / s for s in seconds])}  peak GPU memory "
                  f"{memory[kind]:.2f} GiB")
    if nnsight is None:
        print("nnsight: not installed here (pip install -r benchmarks/requirements-peers.txt)")


if __name__ == "__main__":
    main()
