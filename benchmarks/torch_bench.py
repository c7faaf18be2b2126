"""ActivationDataset vs the raw chunk reads it is built on: tokens per second streaming a store into PyTorch.

    python benchmarks/torch_bench.py --store STORE [--pairs 3] [--site resid_pre] [--before DIR] [--inprocess 8]

What each side does, per committed chunk of ``--site`` (all stored layers), every committed token once:

- ``raw``: ``array[:, chunk]`` with zarr: read the file, check crc32c (and zstd-decompress where the store has it),
  copy into a fresh numpy array in the stored dtype (bf16). Nothing else: the floor of any reader.
- ``raw-f32``: the same, then ``.astype(np.float32)``: the floor of any reader that hands out float32 (the honest
  baseline for the float32 dataset; float32 is what it yields).
- ``dataset``: ``ActivationDataset(store, site, batch_size=1024, shuffle=True, buffer_chunks=4)``, float32, consumed
  in the main process (no DataLoader workers): rows shuffled within each 4-chunk buffer, token-major
  ``(1024, layers, d_model)`` float32 tensors with the token metadata.
- ``dataset-bf16``: the same with ``dtype=torch.bfloat16`` (compare with ``raw``).
- ``dataset-2workers``: ``dataset`` through ``DataLoader(batch_size=None, num_workers=2)``.
- ``before-dataset`` / ``before-bf16`` (with ``--before DIR``): ``dataset`` / ``dataset-bf16`` run with DIR first on
  ``PYTHONPATH`` (an export of an older depthcache), for before/after ratios in the same run.

Each measurement runs in its own process (peak RSS is that process's ``VmHWM``; the DataLoader workers' memory is
not in it); the clock covers opening and checking the store and the whole pass, not the imports. One untimed raw
pass warms the page cache; then the kinds run in turn, interleaved, for ``--pairs`` rounds. Prints medians, ranges
and each ratio per round. ``--inprocess N`` then runs raw-f32, dataset, raw, dataset-bf16 in turn N times in one
process (no start-up noise; each pass still opens and checks the store and builds its dataset), for tighter pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

KINDS = ("raw", "raw-f32", "dataset", "dataset-bf16", "dataset-2workers")
BEFORE = {"before-dataset": "dataset", "before-bf16": "dataset-bf16"}  # measured with the older code
RATIOS = (("dataset", "raw-f32"), ("dataset", "raw"), ("dataset-bf16", "raw"), ("dataset-2workers", "raw-f32"),
          ("before-dataset", "raw-f32"), ("before-dataset", "raw"), ("before-bf16", "raw"))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def raw(store: str, site: str, float32: bool) -> int:
    """Read every committed chunk of ``site`` in order (as float32 if asked); returns the tokens read."""
    import numpy as np

    from depthcache.store.io import open_group
    from depthcache.store.schema import check_store

    group = open_group(store)
    attrs, array = check_store(group), group[site]
    tokens, step = int(attrs["progress"]["tokens_committed"]), int(attrs["layout"]["chunk_tokens"])
    for start in range(0, tokens, step):
        block = array[:, start:min(start + step, tokens)] if array.ndim == 3 else array[start:start + step]
        if float32:
            block = block.astype(np.float32)
        assert block.size
    return tokens


def dataset(store: str, site: str, bf16: bool, workers: int = 0) -> int:
    """Iterate an ActivationDataset over the whole store (through a DataLoader with ``workers`` processes if any);
    returns the rows yielded."""
    import torch

    from depthcache.torch import ActivationDataset

    rows = ActivationDataset(store, site, batch_size=1024, shuffle=True, buffer_chunks=4,
                             dtype=torch.bfloat16 if bf16 else torch.float32)
    batches = torch.utils.data.DataLoader(rows, batch_size=None, num_workers=workers) if workers else rows
    return sum(len(batch["token"]) for batch in batches)


def one(kind: str, store: str, site: str) -> None:
    """Run one measurement in this process and print it as JSON."""
    import depthcache  # noqa: F401 - the bfloat16 zarr data type, imported before the clock starts
    import torch  # noqa: F401

    from depthcache.torch import ActivationDataset  # noqa: F401

    start = time.perf_counter()
    if kind.startswith("raw"):
        tokens = raw(store, site, float32=kind == "raw-f32")
    else:
        tokens = dataset(store, site, bf16=kind.endswith("bf16"), workers=2 if kind.endswith("2workers") else 0)
    seconds = time.perf_counter() - start
    print(json.dumps({"kind": kind, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                      "peak_rss_mib": peak_rss_mib()}))


def inprocess(store: str, site: str, rounds: int) -> None:
    """Alternate the in-process kinds ``rounds`` times in this process; print each pass as JSON."""
    import depthcache  # noqa: F401
    import torch  # noqa: F401

    from depthcache.torch import ActivationDataset  # noqa: F401

    for _ in range(rounds):
        for kind in ("raw-f32", "dataset", "raw", "dataset-bf16"):
            start = time.perf_counter()
            tokens = raw(store, site, kind == "raw-f32") if kind.startswith("raw") else dataset(
                store, site, bf16=kind.endswith("bf16"))
            print(json.dumps({"kind": kind, "tokens_per_s": tokens / (time.perf_counter() - start)}), flush=True)


def measure(kind: str, store: str, site: str, before: str | None) -> dict:
    """One measurement in a fresh process (with the older code first on the path for the before- kinds)."""
    env = dict(os.environ)
    if kind.startswith("before-"):
        env["PYTHONPATH"] = os.pathsep.join([before or "", env.get("PYTHONPATH", "")])
        kind = BEFORE[kind]
    done = subprocess.run([sys.executable, __file__, "--one", kind, "--store", store, "--site", site],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--before", default=None, help="a folder holding an older depthcache package")
    parser.add_argument("--inprocess", type=int, default=0, help="then N in-process rounds")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "inprocess":
        inprocess(args.store, args.site, args.inprocess)
        return
    if args.one:
        one(args.one, args.store, args.site)
        return
    kinds = KINDS + (tuple(BEFORE) if args.before else ())
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    measure("raw", args.store, args.site, None)  # warm the page cache, untimed
    rounds = []
    for number in range(args.pairs):
        rounds.append({kind: measure(kind, args.store, args.site, args.before) for kind in kinds})
        print(f"round {number + 1}: " + ", ".join(f"{kind} {r['tokens_per_s']:.0f}" for kind, r in rounds[-1].items())
              + f" tok/s; load {os.getloadavg()[0]:.1f}", flush=True)
    for kind in kinds:
        speeds = [r[kind]["tokens_per_s"] for r in rounds]
        rss = [r[kind]["peak_rss_mib"] for r in rounds]
        print(f"{kind:17s} median {statistics.median(speeds):8.0f} tok/s (range {min(speeds):.0f}-{max(speeds):.0f}),"
              f" peak RSS median {statistics.median(rss):.0f} MiB")
    for a, b in RATIOS:
        if a in kinds and b in kinds:
            ratios = [r[a]["tokens_per_s"] / r[b]["tokens_per_s"] for r in rounds]
            print(f"{a} / {b} per round: {', '.join(f'{x:.2f}' for x in ratios)}; median "
                  f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; tokens per pass: "
          f"{rounds[0]['raw']['tokens']}", flush=True)
    if args.inprocess:
        done = subprocess.run([sys.executable, __file__, "--one", "inprocess", "--inprocess", str(args.inprocess),
                               "--store", args.store, "--site", args.site], capture_output=True, text=True, check=True)
        passes = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        speed = {kind: [p["tokens_per_s"] for p in passes if p["kind"] == kind] for kind in
                 ("raw-f32", "dataset", "raw", "dataset-bf16")}
        for a, b in (("dataset", "raw-f32"), ("dataset-bf16", "raw")):
            ratios = [x / y for x, y in zip(speed[a], speed[b])]
            print(f"in-process {a} / {b}: {', '.join(f'{x:.2f}' for x in ratios)}; median "
                  f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); {a} median "
                  f"{statistics.median(speed[a]):.0f} tok/s, {b} {statistics.median(speed[b]):.0f}")
        print(f"load average after in-process: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
