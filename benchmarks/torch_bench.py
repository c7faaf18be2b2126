"""ActivationDataset vs the raw chunk reads it is built on: tokens per second streaming a store into PyTorch.

    python benchmarks/torch_bench.py --store runs/demo.zarr [--pairs 3] [--site resid_pre]

(a) raw: every committed chunk of ``--site`` (all stored layers) read with zarr in order, decoded to numpy (what
any reader must do); (b) ``ActivationDataset(store, site, batch_size=1024, shuffle=True, buffer_chunks=4)`` in
float32, consumed in the main process (no DataLoader workers); (c) the same in bf16; (d) (b) through a DataLoader
with 2 worker processes (the chunk list split between them). Each measurement runs in its own
process (peak RSS is that process's ``VmHWM``), after one untimed raw pass warms the page cache; the order is
interleaved a b c d a b c d ... for ``--pairs`` rounds. Prints medians, ranges and the ratio (b) / (a) per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

KINDS = ("raw", "dataset", "dataset-bf16", "dataset-2workers")

def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def raw(store: str, site: str) -> int:
    """Read every committed chunk of ``site`` in order; returns the tokens read."""
    from depthcache.store.reader import Store

    opened = Store(store)
    attrs, array = opened.attrs, opened.group[site]
    tokens, step = int(attrs["progress"]["tokens_committed"]), int(attrs["layout"]["chunk_tokens"])
    for start in range(0, tokens, step):
        block = array[:, start:min(start + step, tokens)] if array.ndim == 3 else array[start:start + step]
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
    tokens = (raw(store, site) if kind == "raw" else
              dataset(store, site, bf16=kind == "dataset-bf16", workers=2 if kind == "dataset-2workers" else 0))
    seconds = time.perf_counter() - start
    print(json.dumps({"kind": kind, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                      "peak_rss_mib": peak_rss_mib()}))


def measure(kind: str, store: str, site: str) -> dict:
    """One measurement in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--one", kind, "--store", store, "--site", site],
                          capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.store, args.site)
        return
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    measure("raw", args.store, args.site)  # warm the page cache, untimed
    rounds = [{kind: measure(kind, args.store, args.site) for kind in KINDS}
              for _ in range(args.pairs)]
    for kind in KINDS:
        speeds = [r[kind]["tokens_per_s"] for r in rounds]
        rss = [r[kind]["peak_rss_mib"] for r in rounds]
        print(f"{kind:13s} median {statistics.median(speeds):8.0f} tok/s (range {min(speeds):.0f}-{max(speeds):.0f}),"
              f" peak RSS median {statistics.median(rss):.0f} MiB")
    for kind in KINDS[1:]:
        ratios = [r[kind]["tokens_per_s"] / r["raw"]["tokens_per_s"] for r in rounds]
        print(f"{kind} / raw per round: {', '.join(f'{x:.2f}' for x in ratios)}; median "
              f"{statistics.median(ratios):.2f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}; tokens per pass: {rounds[0]['raw']['tokens']}")


if __name__ == "__main__":
    main()
