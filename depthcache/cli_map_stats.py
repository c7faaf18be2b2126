"""The map-stats commands: stream two live models into layer-map statistics, and merge workers' statistics."""

from __future__ import annotations

from typing import Any

import click

from depthcache.cli_options import placement_from, placement_options
from depthcache.defaults import DEFAULT_MODEL

LAYERS_HELP = "'all', or indices and ranges such as '0-5,10'; for resid the last index names the final residual"


@click.command(name="map-stats")
@click.option("--shallow", required=True, help="The shallow model (alias, local HF folder, .gguf file or hub id).")
@click.option("--deep", default=DEFAULT_MODEL, show_default=True, help="The deep model (same tokenizer).")
@click.option("--out", required=True, help="New statistics folder (or the one to continue with --resume).")
@click.option("--data", default=None, help="Text to stream: as extract --data (default: extract's default).")
@click.option("--max-tokens", default=65536, show_default=True, type=int,
              help="Tokens streamed through both models (0: the whole dataset).")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Window length (as extract --seq-len).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--layers", default="all", show_default=True, help=f"Shallow boundaries: {LAYERS_HELP}.")
@click.option("--deep-layers", default="all", show_default=True, help=f"Deep boundaries: {LAYERS_HELP}.")
@click.option("--site", default="resid", show_default=True, type=click.Choice(["resid", "attn", "mlp"]),
              help="What is mapped: residual boundaries, or the attention / MLP outputs.")
@click.option("--test-tokens", default=8192, show_default=True, type=int,
              help="Held-out test rows (whole windows, kept as rows: R², the paper's ‖ŷ−y‖/‖y‖, jackknife).")
@click.option("--val-tokens", default=4096, show_default=True, type=int,
              help="Held-out validation rows (whole windows) that choose each map's ridge penalty.")
@click.option("--include-first/--no-include-first", default=False, show_default=True,
              help="Use position 0 of each window (the BOS/attention-sink position) too.")
@click.option("--curve-start", default=1024, show_default=True, type=int,
              help="Learning-curve points: the training sums are saved at this many × 2^k rows (0: none).")
@click.option("--product-rows", default=4096, show_default=True, type=int,
              help="Training rows per product (whole windows): larger GEMMs, more memory.")
@click.option("--products", default="float32", show_default=True, type=click.Choice(["float32", "float64"]),
              help="Precision of the products (summed in float64 either way).")
@click.option("--checkpoint-minutes", default=10.0, show_default=True, type=float,
              help="Atomic checkpoint at least this often (and at each curve point); --resume continues from it.")
@click.option("--memory-gib", default=None, type=float,
              help="Budget for the sums and rows (default: 90% of the memory left after loading the models).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@placement_options
@click.option("--accumulate-on", default="auto", show_default=True, type=click.Choice(["auto", "host", "device"]),
              help="Where the sums live: the models' device (torch; auto on CUDA) or the host (numpy).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (bit-identical to one run).")
@click.option("--num-workers", type=int, default=None, help="Processes splitting the windows (default: $WORLD_SIZE / "
              "Slurm, else 1); each writes its own --out, merged by depthcache merge-stats.")
@click.option("--worker-index", type=int, default=None, help="This process's index (default: $RANK / Slurm).")
@click.option("--no-check", "check", flag_value=False, default=True,
              help="Skip the load check of both models (only when you know why).")
@click.option("--progress/--no-progress", default=None,
              help="Tokens/s and ETA (default: a bar on a terminal, else a line per minute on stderr).")
def map_stats(**kw: Any) -> None:
    """Stream a shallow and a deep model over the same windows and save the layer-map statistics (sums for every
    pair of boundaries, held-out rows): no activation is stored. Fit them with `depthcache analyze layer-map OUT`.

    \b
    Example (the paper's question at scale, 4 workers on a Slurm array):
      depthcache map-stats --shallow qwen2.5-coder-0.5b --deep qwen2.5-coder-1.5b \\
          --data corpus.jsonl --max-tokens 1000000 --out stats-$SLURM_PROCID
      depthcache merge-stats stats stats-0 stats-1 stats-2 stats-3
      depthcache analyze layer-map stats

    \b
    Two 70B-class models on one node of 8 GPUs: --device-map auto --max-memory cuda:0=70GiB,...,cpu=200GiB
    (the sums live on the first model's device: --accumulate-on host keeps them in host memory instead).
    """
    from depthcache.extraction.data import DEFAULT_DATASET
    from depthcache.extraction.map_stats import MapStatsOptions
    from depthcache.extraction.map_stats import map_stats as run
    from depthcache.extraction.workers import worker_from_env

    env = worker_from_env()
    kw["num_workers"] = kw["num_workers"] or env.count
    kw["worker_index"] = env.index if kw["worker_index"] is None else kw["worker_index"]
    kw["data"] = kw["data"] or DEFAULT_DATASET
    kw["max_tokens"] = kw["max_tokens"] or None
    out = run(MapStatsOptions(**placement_from(kw)))
    click.echo(f"{out}: layer-map statistics saved (fit them: depthcache analyze layer-map {out})")


@click.command(name="merge-stats")
@click.argument("out")
@click.argument("parts", nargs=-1, required=True)
def merge_stats(out: str, parts: tuple[str, ...]) -> None:
    """Sum the statistics of map-stats workers (disjoint windows of one run) into one new folder OUT."""
    from pathlib import Path

    from depthcache.store.map_stats import merge_stats as merge

    merged = merge([Path(p) for p in parts], Path(out))
    click.echo(f"{out}: {len(parts)} parts merged, {merged.train.n:,} training rows, "
               f"{len(merged.heldout_split):,} held-out rows")
