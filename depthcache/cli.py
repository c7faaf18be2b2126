"""Command line: parses options and calls the library; user mistakes print one clear line, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Any

# Before torch is loaded: OpenMP threads waiting for work sleep instead of spinning. Where the cores are shared
# (more runnable processes than cores) spinning threads burn the time slices the working ones need: scoring a task
# on a small model ran 30x slower that way on 2 cores with ~20 runnable processes. OMP_WAIT_POLICY=ACTIVE in the
# environment restores spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from depthcache.errors import DepthcacheError  # noqa: E402


class Commands(click.Group):
    """A click group that turns DepthcacheError into 'error: …' and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DepthcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="depthcache")
def main() -> None:
    """Cache a language model's per-layer activations in a Zarr store, then analyse how it uses its depth.

    \b
    Typical session:
      depthcache extract --out runs/demo.zarr          # SmolLM2-135M on Python's docs
      depthcache info runs/demo.zarr
      depthcache analyze contributions runs/demo.zarr
      depthcache plot runs/demo.zarr contributions
    """


progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="Progress with ETA (default: a bar on a terminal, else a line per step or per minute on stderr; "
         "--progress forces the bar, --no-progress silences both).")


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Alias (smollm2-135m, qwen2.5-coder-0.5b), local HF folder, .gguf file, or hub id.")
@click.option("--data", default="pydoc-topics", show_default=True,
              help="Built-in dataset name, .txt file, folder of .txt files, .jsonl with a 'text' field, or a task, "
                   "one window per item: task:two-hop-facts?n=60, task:arithmetic-chain?max_ops=3, task:FILE.jsonl.")
@click.option("--out", required=True, help="Store to create (a folder ending in .zarr).")
@click.option("--sites", default="resid,attn,mlp", show_default=True,
              help="Which activations to store: resid (resid_pre + resid_final), attn, mlp.")
@click.option("--layers", default="all", show_default=True, help="Layers to store, e.g. 'all', '0-5,10'.")
@click.option("--max-tokens", default=16384, show_default=True, type=int,
              help="Stop after this many tokens (0: the whole dataset).")
@click.option("--seq-len", default=128, show_default=True, type=int, help="Tokens per model input window.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Stored dtype of activations (bf16: half of f32's bytes, never overflows).")
@click.option("--top-k", default=20, show_default=True, type=int, help="Top-k final log-probs kept per token.")
@click.option("--chunk-tokens", default=None, type=int,
              help="Tokens per chunk (default: largest power of two keeping a chunk of all layers ≤ 32 MiB).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction into --out (options must match).")
@progress_option
@click.option("--num-workers", type=int, default=None,
              help="Processes writing disjoint shards of one store (default: $WORLD_SIZE / Slurm, else 1).")
@click.option("--worker-index", type=int, default=None, help="This process's index (default: $RANK / Slurm).")
@click.option("--finalize", is_flag=True, help="Only mark a store written by several workers complete.")
@click.option("--skip", default=None,
              help="Also store layer-skip runs beside the baseline (runs/skip_<l>): one layer '7', one run per layer "
                   "'3,7', one run skipping several '3+7', 'each', or 'range 20-29'.")
@click.option("--skip-sublayer", default="layer", show_default=True, type=click.Choice(["layer", "attn", "mlp"]),
              help="What a skip removes: the whole layer, or only its attention or MLP branch.")
@click.option("--skip-tokens", default=4096, show_default=True, type=int,
              help="Baseline tokens each skip run covers, rounded up to whole chunks (0: all).")
@click.option("--skip-variant", default="current", show_default=True, type=click.Choice(["current", "future"]),
              help="current: skip positions 1..T; future: skip positions 1..t-1 for 4 drawn t per window, effects "
                   "measured at positions >= t.")
@click.option("--skip-prefix", default="baseline", show_default=True, type=click.Choice(["baseline", "recompute"]),
              help="baseline: feed the stored baseline residual into the first skipped layer instead of recomputing "
                   "the layers before it.")
def extract(finalize: bool, skip: str | None, skip_sublayer: str, skip_tokens: int, skip_variant: str,
            skip_prefix: str, **kw: Any) -> None:
    """Run a model over a dataset and store every layer's residual stream and sublayer outputs."""
    from depthcache.extraction.engine import ExtractOptions, finalize_store
    from depthcache.extraction.engine import extract as run_extract
    from depthcache.extraction.workers import worker_from_env

    if finalize:
        attrs = finalize_store(kw["out"])
    else:
        env = worker_from_env()
        kw["num_workers"] = kw["num_workers"] or env.count
        kw["worker_index"] = env.index if kw["worker_index"] is None else kw["worker_index"]
        kw["max_tokens"] = kw["max_tokens"] or None
        if skip:
            from depthcache.extraction.skip_runs import SkipOptions, extract_skips

            runs = extract_skips(ExtractOptions(**kw), SkipOptions(skip, skip_sublayer, skip_tokens or None,
                                                                   skip_variant, skip_prefix))
            for name, run in runs.items():
                click.echo(f"{kw['out']}/runs/{name}: {run['progress']['tokens_committed']:,} tokens")
            return
        attrs = run_extract(ExtractOptions(**kw))
    if attrs["progress"]["complete"]:
        click.echo(f"{kw['out']}: complete, {attrs['progress']['tokens_committed']:,} tokens")
    else:
        click.echo(f"{kw['out']}: worker {kw['worker_index']} of {kw['num_workers']} done; the store is complete "
                   "when every worker has finished (the last one marks it, or run extract --finalize)")


def storage_option(command: Any) -> Any:
    """The ``--storage-option key=value`` option of every command taking a STORE that may be a URL."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for a URL store (s3://…), e.g. endpoint_url=http://host:9000; "
                             "repeatable. Credentials come from the usual environment variables.")(command)


@main.command()
@click.argument("store")
@storage_option
def info(store: str, storage_options: tuple[str, ...]) -> None:
    """Summarise a store (folder or URL): model, layers, sites, tokens, size on disk and compression."""
    from depthcache.summary import summary

    click.echo(summary(store, parse_params(storage_options)))


@main.command()
@click.argument("store")
@click.option("--quick", is_flag=True, help="Check schema and shapes only; skip reading every chunk.")
@storage_option
def validate(store: str, quick: bool, storage_options: tuple[str, ...]) -> None:
    """Check a store against the schema, its shapes, and every chunk's checksum."""
    from depthcache.store.schema import validate_store

    problems = validate_store(store, read_chunks=not quick, storage_options=parse_params(storage_options))
    if problems:
        raise DepthcacheError(f"{store} is invalid:\n  " + "\n  ".join(problems))
    click.echo(f"{store}: valid")


class AnalysisGroup(click.Group):
    """``depthcache analyze NAME STORE...``: one subcommand per registered analysis, plus ``list``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from depthcache.analyze import describe

        return ["list", *[name for name, _, _ in describe()]]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "list":
            return analyze_list
        from depthcache.analyze import load_all

        spec = load_all().get(name)
        return None if spec is None else analysis_command(spec)


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``-p key=value`` pairs → parameters (values parsed as JSON when they can be, else kept as strings)."""
    import json

    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DepthcacheError(f"parameter {pair!r} is not key=value")
        try:
            params[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = value
    return params


def analysis_command(spec: Any) -> click.Command:
    """A click command running one analysis on its store(s)."""
    stores = "SHALLOW DEEP" if spec.n_stores == 2 else "STORE"

    from depthcache.analyze.registry import describe_parameters

    @click.command(name=spec.name, help=f"{spec.summary}\n\nArguments: {stores}.\n\nParameters (-p KEY=VALUE, "
                                        f"values as JSON): {describe_parameters(spec)}.")
    @click.argument("stores", nargs=spec.n_stores)
    @click.option("-p", "--param", "params", multiple=True, help="Analysis parameter key=value (repeatable).")
    @click.option("--force", is_flag=True, help="Recompute even if a cached result exists.")
    @click.option("--scheduler", default=None, help="dask.distributed scheduler address (or $DEPTHCACHE_SCHEDULER).")
    @click.option("--results", default=None, help="Folder for results when the store is not writable (or a URL).")
    @storage_option
    @progress_option
    def command(stores: tuple[str, ...], params: tuple[str, ...], force: bool, scheduler: str | None,
                results: str | None, storage_options: tuple[str, ...], progress: bool | None) -> None:
        from depthcache.analyze import run
        from depthcache.progress import dask_progress, shown

        stores = (stores,) if isinstance(stores, str) else stores
        with shown(progress), dask_progress(f"analyze {spec.name}"):
            result = run(spec.name, *stores, force=force, scheduler_address=scheduler, results_dir=results,
                         storage_options=parse_params(storage_options), **parse_params(params))
        click.echo(result.drop_attrs().to_dataframe().to_string() if len(result.dims) <= 2 else str(result))
    return command


@main.group(cls=AnalysisGroup)
def analyze() -> None:
    """Compute an analysis from a store (cached in STORE/analyses/NAME; `analyze list` shows them all)."""


@click.command(name="list")
def analyze_list() -> None:
    """List every analysis, one line each."""
    from depthcache.analyze import describe

    for name, summary, n in describe():
        click.echo(f"{name:<18} {'(2 stores) ' if n == 2 else ''}{summary}")


@main.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--out", "out_dir", default=None, help="Folder for the PNGs (default: STORE's name + .plots).")
@click.option("-p", "--param", "params", multiple=True, help="Analysis parameter key=value (repeatable).")
@click.option("--force", is_flag=True, help="Recompute the analysis first.")
@click.option("--results", default=None, help="Folder for results when the store is not writable (or a URL).")
@storage_option
def plot(args: tuple[str, ...], out_dir: str | None, params: tuple[str, ...], force: bool, results: str | None,
         storage_options: tuple[str, ...]) -> None:
    """Draw an analysis's figures: `plot STORE NAME` (or `plot SHALLOW DEEP NAME` for two-store analyses)."""
    from depthcache.analyze import plot as draw
    from depthcache.locate.maps import is_map
    from depthcache.locate.plot import plot_map_store

    *stores, name = args
    extra = {"storage_options": parse_params(storage_options)} if storage_options else {}
    if len(stores) == 1 and is_map(stores[0]):  # a location map (erase/igrad) is a result already
        paths = plot_map_store(stores[0], name, out_dir)
    else:
        paths = draw(name, *stores, out_dir=out_dir, force=force, results_dir=results, **extra, **parse_params(params))
    for path in paths:
        click.echo(str(path))


def locate_options(command: Any) -> Any:
    """The options ``erase`` and ``igrad`` share: model, one prompt or a task, output store, device."""
    options = [
        click.option("--model", default="smollm2-135m", show_default=True,
                     help="Alias (smollm2-135m, qwen2.5-coder-0.5b), local HF folder, .gguf file, or hub id."),
        click.option("--prompt", default=None, help="The prompt, e.g. '5+7+5+3+1+7='."),
        click.option("--answer", default=None, help="Its answer, a token continuation of the prompt, e.g. '28'."),
        click.option("--task", default=None, help="Instead of --prompt/--answer: a built-in task or a .jsonl file."),
        click.option("--n", default=None, type=int, help="With --task: a seeded subset of this many items."),
        click.option("--out", required=True, help="Location-map store to write (a folder ending in .zarr)."),
        click.option("--layers", default="all", show_default=True, help="Layers to map, e.g. 'all', '0-5,20'."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", default=64, show_default=True, type=int,
                     help="Sequences per forward pass (erase: erased positions; igrad: points on the path)."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run from OUT.partial (each finished layer is saved there)."),
        progress_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@locate_options
@click.option("--reference", default=None,
              help="Activation store of the same model whose mean resid_pre (positions >= 1) is the erased value "
                   "(default: the mean over --reference-windows windows of pydoc-topics).")
@click.option("--reference-windows", default=8, show_default=True, type=int,
              help="Without --reference: 128-token pydoc-topics windows averaged for the mean residual.")
def erase(**kw: Any) -> None:
    """Residual erasure: replace each (layer, position) residual by the layer's mean, record max |Δ p(answer)|."""
    from depthcache.locate import LocateOptions, locate

    ds = locate("erasure", LocateOptions(**kw))
    click.echo(f"{kw['out']}: erasure map, {ds.sizes['layer']} layers x {ds.sizes['position']} positions"
               + (f" x {ds.sizes['item']} items" if "item" in ds.dims else ""))


@main.command()
@locate_options
@click.option("--steps", default=64, show_default=True, type=int,
              help="Equal trapezoid intervals each layer's path integral starts from (steps + 1 points, evaluated "
                   "--batch-size at a time in one forward/backward pass), before adaptive refinement.")
@click.option("--tolerance", default=0.01, show_default=True, type=float,
              help="Bisect the intervals with the largest completeness error until |sum(attribution) - (f(h) - "
                   "f(baseline))| is at most this times max(|f(h) - f(baseline)|, 0.01).")
@click.option("--max-steps", default=4096, show_default=True, type=int,
              help="Most intervals per layer after refinement (= --steps: no refinement).")
def igrad(**kw: Any) -> None:
    """Integrated gradients on the residual at every (layer, position), with a completeness check per layer."""
    from depthcache.locate import LocateOptions, locate
    from depthcache.locate.igrad import completeness_error

    ds = locate("igrad", LocateOptions(**kw))
    error = completeness_error(ds)
    click.echo(f"{kw['out']}: igrad map, {ds.sizes['layer']} layers x {ds.sizes['position']} positions"
               + (f" x {ds.sizes['item']} items" if "item" in ds.dims else "")
               + f"; {int(ds.intervals.min())}-{int(ds.intervals.max())} intervals per layer; completeness: max "
               f"|sum(attribution) - (f(h) - f(baseline))| / max(|f(h) - f(baseline)|, 0.01) = {error:.3g}")
    if error > kw["tolerance"]:
        click.echo(f"warning: completeness {error:.3g} is above --tolerance {kw['tolerance']} where --max-steps "
                   f"{kw['max_steps']} was reached; raise --max-steps before reading magnitudes there", err=True)


def copy_and_report(source: str, destination: str, jobs: int, options: dict[str, Any], push: bool,
                    progress: bool | None) -> None:
    """Run a push or pull and print what it did; a failed verification is an error."""
    from depthcache.sharing import copy_store

    kw = {"destination_options": options} if push else {"source_options": options}
    report = copy_store(source, destination, jobs=jobs, progress=progress, **kw)
    if report.problems:
        raise DepthcacheError(f"{destination} failed verification after the copy: {report.problems[0]}"
                              f"{f' (and {len(report.problems) - 1} more)' if len(report.problems) > 1 else ''}; "
                              "run the same command again to repair it")
    click.echo(f"{destination}: {report.copied} objects copied ({report.bytes_copied / 2**20:,.1f} MiB), "
               f"{report.skipped} already there; every chunk verified ({report.seconds:.1f} s)")


@main.command()
@click.argument("store")
@click.argument("url")
@click.option("--jobs", default=16, show_default=True, type=int, help="Objects copied in parallel.")
@storage_option
@progress_option
def push(store: str, url: str, jobs: int, storage_options: tuple[str, ...], progress: bool | None) -> None:
    """Copy a local store to URL (s3://bucket/run.zarr): parallel, resumable, every chunk verified at the end."""
    copy_and_report(store, url, jobs, parse_params(storage_options), push=True, progress=progress)


@main.command()
@click.argument("url")
@click.argument("store")
@click.option("--jobs", default=16, show_default=True, type=int, help="Objects copied in parallel.")
@storage_option
@progress_option
def pull(url: str, store: str, jobs: int, storage_options: tuple[str, ...], progress: bool | None) -> None:
    """Copy a store from URL to a local folder: parallel, resumable, every chunk verified at the end."""
    copy_and_report(url, store, jobs, parse_params(storage_options), push=False, progress=progress)


@main.command()
@click.argument("store")
@click.option("--out", default=None, help="HTML file to write (default: STORE's name + .html).")
@storage_option
def report(store: str, out: str | None, storage_options: tuple[str, ...]) -> None:
    """One self-contained HTML page: the store's provenance and every analysis cached in it, with figures."""
    from depthcache.report import write_report
    from depthcache.store.io import local_name

    path = write_report(store, out or str(local_name(store).with_suffix(".html")), parse_params(storage_options))
    click.echo(str(path))


@main.command(name="prune-copy")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Alias, local HF folder, .gguf file, or hub id of the model to copy.")
@click.option("--keep", default="every-other", show_default=True,
              help="Layers to keep: 'every-other' (0, 2, 4, ...) or a layer spec such as '0-9,20'.")
@click.option("--out", required=True, help="New folder for the pruned Hugging Face model (loads with --model OUT).")
def prune_copy(model: str, keep: str, out: str) -> None:
    """Save a copy of a model with layers removed (same tokenizer), e.g. a shallow model for layer-map."""
    from depthcache.model import prune_copy as make_copy

    click.echo(f"{make_copy(model, keep, out)}: pruned copy of {model} (kept layers: {keep})")


@main.group()
def evaluate() -> None:
    """Score a model on a task with parts of it removed (likelihood- vs generation-based evaluation)."""


@evaluate.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Alias (smollm2-135m, qwen2.5-coder-0.5b), local HF folder, .gguf file, or hub id.")
@click.option("--task", required=True,
              help="Built-in task (addition, arithmetic-chain, two-hop-facts, prose-continuation) or a .jsonl file.")
@click.option("--layers", default="all", show_default=True, help="Candidate layers to remove, e.g. '20-29'.")
@click.option("--metric", "metrics", default="likelihood,generation", show_default=True,
              help="likelihood (gold log-prob, accuracy among choices) and/or generation (greedy, exact match).")
@click.option("--order", default="last-first", show_default=True,
              type=click.Choice(["last-first", "first-first", "influence", "greedy"]),
              help="Removal order: by depth, by block influence 1 - cos(h_l, h_l+1) (lowest first), or greedy "
                   "(the least harmful next layer by gold log-prob; costs one likelihood pass per candidate).")
@click.option("--n", default=50, show_default=True, type=int, help="Task items (a seeded subset; 0: all).")
@click.option("--seed", default=None, type=int, help="Task seed (default: the task's own).")
@click.option("--steps", default=None, type=int, help="Most layers removed (default: every candidate).")
@click.option("--max-new-tokens", default=16, show_default=True, type=int, help="Greedy decoding length limit.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Items per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", default=None,
              help="Folder for prune.zarr, prune.csv, prune-items.csv and prune.png (default: runs/prune-TASK).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from OUT/prune.partial (each finished step is saved there).")
@progress_option
def prune(**kw: Any) -> None:
    """Remove more and more layers and score a task by likelihood and by generation at each step."""
    from pathlib import Path

    from depthcache.evaluate import PruneOptions, evaluate_prune

    kw["n"] = kw["n"] or None
    kw["out"] = kw["out"] or f"runs/prune-{Path(kw['task']).stem}"
    ds = evaluate_prune(PruneOptions(**kw))
    click.echo(ds[["n_removed", "removed_layer", "mean_gold_logprob", "choice_accuracy",
                   "exact_match_rate"]].to_dataframe().to_string())
    click.echo(f"written to {kw['out']}/ (prune.zarr, prune.csv, prune-items.csv, prune.png)")


if __name__ == "__main__":
    main()
