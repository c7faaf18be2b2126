"""Analysis throughput and memory: raw chunk reads vs a hand-written numpy loop vs depthcache, measured in one run.

    python benchmarks/analyze_bench.py [--workdir /tmp/depthcache-analyze-bench] [--tokens 8192 53248]
                                       [--rss-cap-mib 1024] [--lens-tokens 1024]

Builds (or reuses) synthetic bf16 stores with SmolLM2-135M's shapes (30 layers, d_model 576, vocab 49152, all
sites, chunks of 512 tokens): a template is extracted from a random-weight model of those shapes (for valid
attributes and a model/ group), then the activations are rewritten with heavy-tailed random data through
depthcache's own layout (``create_arrays``) and ``ChunkWriter``. Every measurement runs in its own process and
reports its peak RSS (``VmHWM``): (a) raw read of every activation chunk (decompress + crc32c),
(b) a plain numpy loop over the same chunks computing the contributions numbers, (c) ``contributions`` and
(d) ``logit-lens`` (first --lens-tokens tokens) through depthcache's default scheduler. Throughput is activation
bytes (bf16, as stored uncompressed) per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, D_MODEL, VOCAB, SEQ_LEN, CHUNK = 30, 576, 49152, 128, 512
SITES = ("resid_pre", "attn_out", "mlp_out")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (VmHWM: unlike ``getrusage``'s ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def template(workdir: Path) -> Path:
    """A 512-token store extracted from a random Llama with SmolLM2-135M's shapes (attributes, model/ group)."""
    out = workdir / "template.zarr"
    if (out / "zarr.json").exists():
        return out
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_tokenizer

    from depthcache.extraction.engine import ExtractOptions, extract

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=256,
                                      num_hidden_layers=LAYERS, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=SEQ_LEN, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model_dir = workdir / "model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tiny_tokenizer(with_bos=False).save_pretrained(model_dir)
    data = workdir / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": "The residual stream carries information. " * 40})
                              for _ in range(8)))
    extract(ExtractOptions(out=str(out), model=str(model_dir), data=str(data), max_tokens=CHUNK, seq_len=SEQ_LEN,
                           chunk_tokens=CHUNK, progress=False, device="cpu"))
    return out


def synthetic_chunk(rng: np.random.Generator, tokens: int) -> dict[str, np.ndarray]:
    """Heavy-tailed activations (Student-t, growing residual scale, a few outlier dimensions) for one chunk, bf16."""
    import ml_dtypes

    scale = np.linspace(1, 20, LAYERS, dtype=np.float32)[:, None, None]
    out = {}
    for name, factor in (("resid_pre", 1.0), ("attn_out", 0.3), ("mlp_out", 0.4)):
        x = rng.standard_t(3, size=(LAYERS, tokens, D_MODEL)).astype(np.float32) * scale * factor
        x[..., :4] *= 30
        out[name] = x.astype(ml_dtypes.bfloat16)
    out["resid_final"] = (out["resid_pre"][-1].astype(np.float32) * 1.1).astype(ml_dtypes.bfloat16)
    return out


def build(workdir: Path, n_tokens: int) -> Path:
    """A synthetic bf16 store of ``n_tokens`` tokens (reused when already complete)."""
    from depthcache.extraction.writer import ChunkWriter
    from depthcache.store.io import open_group, read_attrs, write_attrs
    from depthcache.store.layout import StoreLayout, create_arrays

    out = workdir / f"synthetic-{n_tokens}.zarr"
    if (out / "zarr.json").exists() and read_attrs(open_group(out))["progress"]["complete"]:
        return out
    shutil.rmtree(out, ignore_errors=True)
    base = template(workdir)
    shutil.copytree(base / "model", out / "model")
    shutil.copy(base / "zarr.json", out / "zarr.json")
    group = open_group(out, "r+")
    attrs = read_attrs(group)
    attrs["layout"] |= {"n_tokens": n_tokens, "n_windows": n_tokens // SEQ_LEN}
    attrs["options"]["max_tokens"] = n_tokens
    attrs["progress"] = {"tokens_committed": 0, "complete": False}
    write_attrs(group, attrs)
    layout = StoreLayout(n_tokens, tuple(range(LAYERS)), D_MODEL, attrs["options"]["top_k"],
                         ("resid", "attn", "mlp"), "bfloat16", CHUNK)
    create_arrays(group, layout)

    def commit(stop: int) -> None:
        attrs["progress"] = {"tokens_committed": stop, "complete": stop == n_tokens}
        write_attrs(group, attrs)

    names = [*SITES, "resid_final", "token_id", "doc_id", "seq_id", "position", "next_token_id", "next_logprob",
             "topk_ids", "topk_logprobs"]
    writer = ChunkWriter(group, names, CHUNK, n_tokens, 0, commit)
    rng = np.random.default_rng(0)
    chunk = synthetic_chunk(rng, CHUNK)
    k = attrs["options"]["top_k"]
    for start in range(0, n_tokens, CHUNK):
        pos = np.arange(start, start + CHUNK, dtype=np.int32) % SEQ_LEN
        ids = rng.integers(3, VOCAB, CHUNK, dtype=np.int32)
        # the chunk's activations rolled along tokens: different bytes per chunk, same statistics
        batch = {name: np.roll(chunk[name], start // CHUNK, axis=-2) for name in (*SITES, "resid_final")}
        batch |= {"token_id": ids, "doc_id": np.zeros(CHUNK, np.int32), "position": pos,
                  "seq_id": (np.arange(start, start + CHUNK) // SEQ_LEN).astype(np.int32),
                  "next_token_id": np.roll(ids, -1), "next_logprob": np.full(CHUNK, -3.0, np.float32),
                  "topk_ids": np.zeros((CHUNK, k), np.int32), "topk_logprobs": np.zeros((CHUNK, k), np.float32)}
        writer.append(batch, start)
    writer.close()
    return out


def raw_read(store: Path) -> None:
    """Read every activation chunk (decompress + checksum), nothing else."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    for name in SITES:
        array = group[name]
        for start in range(0, array.shape[1], CHUNK):
            array[:, start:start + CHUNK]


def numpy_loop(store: Path) -> dict[str, np.ndarray]:
    """The contributions numbers (relative contribution and cosine per sublayer, turning, norms) by a plain loop."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    arrays = [group[name] for name in SITES]
    position = group["position"][:]
    sums = np.zeros((2, 11, LAYERS))
    for start in range(0, arrays[0].shape[1], CHUNK):
        h, a, m = (x[:, start:start + CHUNK].astype(np.float32) for x in arrays)
        keep = position[start:start + CHUNK] >= 1
        d, mid = a + m, h + a
        nh, na, nm, nd, nmid = (np.linalg.norm(x, axis=-1) for x in (h, a, m, d, mid))
        vals = np.stack([na / nh, nm / nmid, nd / nh, (a * h).sum(-1) / (na * nh), (m * mid).sum(-1) / (nm * nmid),
                         (d * h).sum(-1) / (nd * nh), na, nm, nd, nh,
                         ((h + d) * h).sum(-1) / (np.linalg.norm(h + d, axis=-1) * nh)])[..., keep]
        sums[0] += vals.astype(np.float64).sum(-1)
        sums[1] += (vals.astype(np.float64) ** 2).sum(-1)
    return sums


def measure(kind: str, store: Path, lens_tokens: int) -> dict[str, float]:
    """Run one measurement in this process; seconds, activation bytes processed, peak RSS."""
    import depthcache  # noqa: F401 - registers bfloat16
    from depthcache.analyze import run

    n_tokens = json.loads((store / "zarr.json").read_text())["attributes"]["depthcache"]["layout"]["n_tokens"]
    results = tempfile.mkdtemp(prefix="bench-results-")
    start = time.perf_counter()
    if kind == "raw":
        raw_read(store)
    elif kind == "numpy":
        numpy_loop(store)
    elif kind == "contributions":
        run("contributions", str(store), force=True, results_dir=results)
    elif kind == "logit-lens":
        run("logit-lens", str(store), force=True, results_dir=results, max_tokens=lens_tokens)
        n_tokens = lens_tokens
    seconds = time.perf_counter() - start
    shutil.rmtree(results, ignore_errors=True)
    return {"seconds": seconds, "bytes": 3 * LAYERS * n_tokens * D_MODEL * 2, "tokens": n_tokens,
            "peak_rss_mib": peak_rss_mib()}


def in_subprocess(kind: str, store: Path, lens_tokens: int) -> dict[str, float]:
    """One measurement in a fresh process (its own peak RSS)."""
    out = subprocess.run([sys.executable, __file__, "--measure", kind, "--store", str(store),
                          "--lens-tokens", str(lens_tokens)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the stores, measure everything, print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/depthcache-analyze-bench")
    parser.add_argument("--tokens", type=int, nargs=2, default=[8192, 53248])
    parser.add_argument("--rss-cap-mib", type=float, default=1024)
    parser.add_argument("--lens-tokens", type=int, default=1024)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.store), args.lens_tokens)))
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    stores = [build(workdir, n) for n in args.tokens]
    rows = {}
    for store in stores:
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
        for kind in ("raw", "numpy", "contributions", "logit-lens"):
            r = in_subprocess(kind, store, args.lens_tokens)
            rows[(store.name, kind)] = r
            print(f"{store.name:<24} {size:8.0f} MiB on disk  {kind:<14} {r['seconds']:7.2f} s  "
                  f"{r['bytes'] / r['seconds'] / 2**20:8.1f} MiB/s  {r['tokens'] / r['seconds']:9.0f} tokens/s  "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
        speed = {k: rows[(store.name, k)]["bytes"] / rows[(store.name, k)]["seconds"] for k in ("raw", "numpy",
                                                                                                  "contributions")}
        print(f"  ratios: contributions / numpy loop = {speed['contributions'] / speed['numpy']:.2f} (goal ≥ 0.8), "
              f"contributions / raw read = {speed['contributions'] / speed['raw']:.2f} (goal ≥ 0.5); store "
              f"{size / args.rss_cap_mib:.1f}× the {args.rss_cap_mib:.0f} MiB cap; contributions peak RSS "
              f"{'within' if rows[(store.name, 'contributions')]['peak_rss_mib'] <= args.rss_cap_mib else 'OVER'} "
              "the cap")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
