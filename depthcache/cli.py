"""Command line: parses options and calls the library; user mistakes print one clear line, never a traceback."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

# Before torch is loaded: OpenMP threads waiting for work sleep instead of spinning. Where the cores are shared
# (more runnable processes than cores) spinning threads burn the time slices the working ones need: scoring a task
# on a small model ran 30x slower that way on 2 cores with ~20 runnable processes. OMP_WAIT_POLICY=ACTIVE in the
# environment restores spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from depthcache.cli_options import options, placement_from, placement_options, progress_option  # noqa: E402
from depthcache.defaults import DEFAULT_MODEL  # noqa: E402
from depthcache.errors import DepthcacheError, Interrupted  # noqa: E402

MODEL_HELP = ("Alias (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, gemma-3-270m), local HF folder, .gguf "
              "file, or hub id.")
TASK_HELP = ("Built-in task (addition, arithmetic-chain, two-hop-facts, prose-continuation, retrieval) or a .jsonl "
             "task file; the same task as extract --data task:NAME.")
N_HELP = ("Task size: a seeded subset of N items (two-hop-facts: N chains, each with its hop items); default: the "
          "task's own size. The same as task:NAME?n=N.")
SEED_HELP = "Seed of the task's items (default: the task's own). The same as task:NAME?seed=S."
LAYERS_HELP = "layer spec: 'all', or indices and ranges such as '0-5,10'"


def model_options(batch_size: int, unit: str, progress: bool = True, model_help: str = MODEL_HELP) -> Any:
    """The options of every command that runs a model: --model, --device, the placement options (read by
    ``placement_from``), --batch-size and --progress."""
    return options(
        click.option("--model", default=DEFAULT_MODEL, show_default=True, help=model_help),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N (with --device-map: cpu keeps the weights off GPUs)."),
        placement_options,
        click.option("--batch-size", default=batch_size, show_default=True, type=int,
                     help=f"{unit} per forward pass."),
        *([progress_option] if progress else []))


def task_options(required: bool, seed: bool) -> Any:
    """--task, --n (and --seed): one way to name a task and its size, meaning what task:NAME?n=N&seed=S means."""
    return options(
        click.option("--task", required=required, default=None, help=TASK_HELP),
        click.option("--n", default=None, type=click.IntRange(min=1), help=N_HELP),
        *([click.option("--seed", default=None, type=click.IntRange(min=0), help=SEED_HELP)] if seed else []))


class Commands(click.Group):
    """A click group that turns DepthcacheError into 'error: …' and exit status 2, a failure to reach a URL or use a
    file that escaped the library likewise (naming it), and an interrupt into 'error: …' (what was kept, how to
    continue) and 128 + the signal's number."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DepthcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Exception as exc:
            failed = failed_access(ctx.args, exc)
            if failed is None:
                raise
            click.echo(f"error: {failed}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            click.echo(f"error: {exc if isinstance(exc, Interrupted) else 'interrupted by SIGINT'}", err=True)
            sys.exit(128 + signum)


def failed_access(args: list[str], exc: Exception) -> DepthcacheError | None:
    """A network or file failure as one line naming the file at fault, else the command's URL; None for anything
    else (a bug: shown with its traceback)."""
    from depthcache.store.io import access_error, is_access_failure, is_url

    where = getattr(exc, "filename", None) or next((arg for arg in args if is_url(arg)), None)
    return access_error(where, exc) if where and is_access_failure(exc) else None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="depthcache")
def main() -> None:
    """Cache a language model's per-layer activations in a Zarr store, then analyse how it uses its depth.

    \b
    Typical session:
      depthcache extract --out runs/demo.zarr          # SmolLM2-135M on Python's docs
      depthcache info runs/demo.zarr
      depthcache analyze contributions runs/demo.zarr
      depthcache plot contributions runs/demo.zarr
    """


@main.command()
@click.option("--data", default="pydoc-topics", show_default=True,
              help="Built-in dataset name, .txt file, folder of .txt files, .jsonl, a Hugging Face dataset folder "
                   "(save_to_disk) or .parquet/.arrow/.csv file, or a task, one window per item: "
                   "task:NAME?n=N&seed=S&OPTION=VALUE, e.g. task:two-hop-facts?n=60, task:arithmetic-chain?max_ops=3, "
                   "task:FILE.jsonl (n counts items, as --task NAME --n N does in erase, igrad and evaluate).")
@click.option("--text-field", default="text", show_default=True, help="Record field holding each document's text.")
@click.option("--prompt-field", default=None,
              help="Read records as task items: the prompt's field, or a template such as "
                   "'Question: {question}\nAnswer:' (one window per item; task:DATA?n=100 takes a seeded subset).")
@click.option("--answer-field", default="answer", show_default=True, help="With --prompt-field: the answer's field.")
@click.option("--answer-after", default=None, help="The answer is the text after the last MARKER (GSM8K: '####').")
@click.option("--answer-regex", default=None, help="The answer is the regex's first match (its group 1 if any).")
@click.option("--split", default=None, help="Split of a saved DatasetDict (default: train, or its only split).")
@click.option("--out", required=True, help="Store to create (a folder ending in .zarr).")
@click.option("--sites", default="resid,attn,mlp", show_default=True,
              help="Which activations to store: resid (resid_pre + resid_final), attn (what the token mixers add: "
                   "attention, Mamba, ...), mlp (what the channel mixers add; none for a model without MLPs), parts "
                   "(each branch module apart where a layer has several of a kind, e.g. Falcon-H1's mamba and "
                   "self_attn: part_<module>).")
@click.option("--layers", default="all", show_default=True, help=f"Layers to store: a {LAYERS_HELP}.")
@click.option("--max-tokens", default=16384, show_default=True, type=int,
              help="Stop after this many tokens (0: the whole dataset).")
@click.option("--seq-len", default=128, show_default=True, type=int, help="Tokens per model input window.")
@model_options(batch_size=8, unit="Windows")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Stored dtype of activations (bf16: half of f32's bytes, never overflows).")
@click.option("--zstd-level", type=int, default=None,
              help="Compress activation chunks with zstd at this level (default: checksum only; zstd 1 saves ~20% "
                   "of bf16's bytes for more CPU time than writing them takes on most machines).")
@click.option("--top-k", default=20, show_default=True, type=int, help="Top-k final log-probs kept per token.")
@click.option("--shard-mib", default=256, show_default=True, type=click.IntRange(1, 1024),
              help="Target size of one shard, the object holding all layers of a run of tokens (schema 2.0: one "
                   "inner chunk per layer, so a layer is read alone). Written whole from memory (one buffer per "
                   "array); 128 or more keeps every array at most one object per 128 MiB.")
@click.option("--chunk-tokens", default=None, type=int,
              help="Tokens per shard (default: the largest power of two within --shard-mib, at most the store's "
                   "tokens); tests and experiments only.")
@click.option("--token-shard-tokens", default=None, type=int,
              help="Tokens per shard of resid_final and the per-token arrays, a multiple of --chunk-tokens (default: "
                   "enough for 128 MiB of resid_final); several workers own whole such shards. Tests only.")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction into --out (options must match).")
@click.option("--num-workers", type=int, default=None,
              help="Processes writing disjoint shards of one store (default: $WORLD_SIZE / Slurm, else 1).")
@click.option("--worker-index", type=int, default=None, help="This process's index (default: $RANK / Slurm).")
@click.option("--finalize", is_flag=True, help="Only mark a store written by several workers complete.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="The load check (the residual identity and the logit lens on 32 tokens) before anything is "
                   "written; --no-check only if you know why.")
@click.option("--skip", default=None,
              help="Also store layer-skip runs beside the baseline (runs/skip_<l>): one layer '7', one run per layer "
                   "'3,7', one run skipping several '3+7', 'each', or 'range 20-29'.")
@click.option("--skip-sublayer", default="layer", show_default=True,
              help="What a skip removes: the whole layer (layer), its token mixers (attn: attention, Mamba, ...), its "
                   "channel mixers (mlp), or one branch module of the model's branch table (e.g. mamba for "
                   "Falcon-H1's Mamba beside attention).")
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
    """Run a model over a dataset and store every layer's residual stream and sublayer outputs.

    \b
    A model larger than one GPU (Llama 3.1 70B in bfloat16 is ~140 GB) is spread over several, the host and disk:
      depthcache extract --model /models/Llama-3.1-70B --device-map auto \\
          --max-memory cuda:0=70GiB,cuda:1=70GiB,cpu=100GiB --offload-folder /scratch/offload \\
          --model-dtype bfloat16 --out runs/llama70b.zarr
    erase, igrad, hop-depth and evaluate prune take the same options.
    """
    from depthcache.extraction.data import DataFields
    from depthcache.extraction.engine import ExtractOptions, finalize_store
    from depthcache.extraction.engine import extract as run_extract
    from depthcache.extraction.workers import worker_from_env

    placement_from(kw)
    kw["fields"] = DataFields(*(kw.pop(name) for name in ("text_field", "prompt_field", "answer_field", "answer_after",
                                                          "answer_regex", "split")))

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


def results_option(command: Any) -> Any:
    """The ``--results`` option: where cached analysis results live when not inside the store."""
    return click.option("--results", default=None,
                        help="Folder for cached analysis results when the store is not writable, e.g. a URL store "
                             "(default: inside a local store; STORE's name + .analyses for a URL).")(command)


def storage_option(command: Any) -> Any:
    """The ``--storage-option key=value`` option of every command taking a STORE that may be a URL."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for a URL store (s3://…), e.g. endpoint_url=http://host:9000; "
                             "repeatable. Credentials come from the usual environment variables.")(command)


@main.command()
@click.argument("store")
@results_option
@storage_option
def info(store: str, results: str | None, storage_options: tuple[str, ...]) -> None:
    """Summarise a store (folder or URL): model, layers, sites, tokens, size on disk, cached analysis results."""
    from depthcache.summary import summary

    click.echo(summary(store, parse_params(storage_options), results))


@main.command()
@click.argument("store")
@click.option("--quick", is_flag=True, help="Check schema and shapes only; skip reading every chunk.")
@storage_option
def validate(store: str, quick: bool, storage_options: tuple[str, ...]) -> None:
    """Check a store against the schema, its shapes, and every chunk's checksum."""
    from depthcache.store.schema import validate, verified

    found = validate(store, read_chunks=not quick, storage_options=parse_params(storage_options))
    if found:
        raise DepthcacheError(f"{store} is invalid:\n  " + "\n  ".join(found.report()))
    click.echo(f"{store}: valid; " + (f"read and verified {verified(found)}" if not quick
                                      else "metadata and chunk presence checked (--quick)"))
    for note in found.notes:
        click.echo(f"note: {note}")


def without_scipy_in_dask() -> None:
    """Import dask.array with scipy hidden, when nothing has imported either yet.

    dask.array imports scipy.sparse and scipy.fftpack if installed, only to register them (sparse chunk types, scipy
    FFTs); depthcache never uses scipy, and in a command that computes an analysis that import was a sixth of the
    start-up. Only the command line does this, for its own process: a library user's dask keeps its scipy support."""
    if "dask.array" in sys.modules or "scipy" in sys.modules:
        return
    sys.modules["scipy"] = None  # type: ignore[assignment]  # `import scipy` raises ImportError, which dask expects
    try:
        import dask.array  # noqa: F401
    finally:
        if sys.modules.get("scipy", 0) is None:
            del sys.modules["scipy"]


class AnalysisGroup(click.Group):
    """``depthcache analyze NAME STORE...``: one subcommand per registered analysis, plus ``list``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from depthcache.analyze import describe

        return ["list", *[name for name, _, _ in describe()]]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "list":
            return analyze_list
        without_scipy_in_dask()
        from depthcache.analyze.registry import find

        spec = find(name)  # imports this analysis's module only
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
    from depthcache.analyze.registry import describe_parameters

    stores = "SHALLOW DEEP" if spec.n_stores == 2 else "STORE"
    stores += " | STATS" if spec.name == "layer-map" else ""  # or one folder of depthcache map-stats

    @click.command(name=spec.name, help=f"{spec.summary}\n\nArguments: {stores}.\n\nParameters (-p KEY=VALUE, "
                                        f"values as JSON): {describe_parameters(spec)}.")
    @click.argument("stores", nargs=-1 if spec.name == "layer-map" else spec.n_stores, metavar=stores, required=True)
    @click.option("-p", "--param", "params", multiple=True, help="Analysis parameter key=value (repeatable).")
    @click.option("--force", is_flag=True, help="Recompute even if a cached result exists.")
    @click.option("--full", is_flag=True, help="Print every value of the result, not a short summary.")
    @click.option("--list-cached", is_flag=True, help="List the cached results of this analysis; compute nothing.")
    @click.option("--clear", is_flag=True,
                  help="Remove the cached results of this analysis (with -p: only that parameter set).")
    @click.option("--scheduler", default=None, help="dask.distributed scheduler address (or $DEPTHCACHE_SCHEDULER).")
    @results_option
    @storage_option
    @progress_option
    def command(stores: tuple[str, ...], params: tuple[str, ...], force: bool, full: bool, list_cached: bool,
                clear: bool, scheduler: str | None, results: str | None, storage_options: tuple[str, ...],
                progress: bool | None) -> None:
        from depthcache.analyze import run
        from depthcache.analyze.text import cache_text, clear_text, result_text
        from depthcache.progress import dask_progress, shown

        stores = (stores,) if isinstance(stores, str) else stores
        kw = {"results_dir": results, "storage_options": parse_params(storage_options)}
        if list_cached or clear:
            click.echo((clear_text if clear else cache_text)(spec, stores, parse_params(params) if clear else None,
                                                             **kw))
            return
        with shown(progress), dask_progress(f"analyze {spec.name}"):
            result = run(spec.name, *stores, force=force, scheduler_address=scheduler, **kw, **parse_params(params))
        click.echo(result_text(spec, result, full))
    return command


@main.group(cls=AnalysisGroup, subcommand_metavar="NAME STORE [ARGS]...")
def analyze() -> None:
    """Compute an analysis from a store: `analyze NAME STORE` (`analyze list` shows every NAME).

    Results are cached beside the store's data, one entry per analysis and parameter set."""


@click.command(name="list")
def analyze_list() -> None:
    """List every analysis, one line each."""
    from depthcache.analyze import describe

    for name, summary, n in describe():
        click.echo(f"{name:<18} {'(2 stores) ' if n == 2 else ''}{summary}")


def plot_arguments(args: tuple[str, ...]) -> tuple[str, list[str]]:
    """(name, stores) from `plot NAME STORE...`; the old order `plot STORE... NAME` still works, with a note."""
    from depthcache.analyze import load_all
    from depthcache.locate.maps import MAP_KINDS

    known = set(load_all()) | set(MAP_KINDS)
    if len(args) < 2:
        raise DepthcacheError("plot needs an analysis name and a store: depthcache plot NAME STORE")
    if args[0] in known or args[-1] not in known:
        return args[0], list(args[1:])
    click.echo(f"note: `depthcache plot STORE NAME` is deprecated and will stop working in the next release; "
               f"write `depthcache plot {args[-1]} {' '.join(args[:-1])}`", err=True)
    return args[-1], list(args[:-1])


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="NAME STORE")
@click.option("--out", "out_dir", default=None, help="Folder for the PNGs (default: STORE's name + .plots).")
@click.option("-p", "--param", "params", multiple=True, help="Analysis parameter key=value (repeatable).")
@click.option("--force", is_flag=True, help="Recompute the analysis first.")
@results_option
@storage_option
def plot(args: tuple[str, ...], out_dir: str | None, params: tuple[str, ...], force: bool, results: str | None,
         storage_options: tuple[str, ...]) -> None:
    """Draw an analysis's figures: `plot NAME STORE` (`plot NAME SHALLOW DEEP` for two-store analyses; `plot erasure
    MAP` or `plot igrad MAP` for a location map)."""
    from depthcache.analyze import plot as draw
    from depthcache.locate.maps import is_map
    from depthcache.locate.plot import plot_map_store

    name, stores = plot_arguments(args)
    extra = {"storage_options": parse_params(storage_options)} if storage_options else {}
    if len(stores) == 1 and is_map(stores[0]):  # a location map (erase/igrad) is a result already
        paths = plot_map_store(stores[0], name, out_dir)
    else:
        paths = draw(name, *stores, out_dir=out_dir, force=force, results_dir=results, **extra, **parse_params(params))
    for path in paths:
        click.echo(str(path))


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Folder for the figures, compare.csv and compare.md.")
@click.option("--analyses", default=None,
              help="Comma-separated subset of contributions, residual-norms, logit-lens, skip-effects, "
                   "effective-depth, layer-map; each must then be available in every store (default: all, leaving "
                   "out with a note what some store lacks).")
@click.option("-p", "--param", "params", multiple=True,
              help="key=value for every compared analysis that takes it, e.g. include_first=true (repeatable).")
@click.option("--force", is_flag=True, help="Recompute the analyses even if cached results exist.")
@click.option("--scheduler", default=None, help="dask.distributed scheduler address (or $DEPTHCACHE_SCHEDULER).")
@click.option("--results", default=None,
              help="Folder for results when stores are not writable: one subfolder per store, named after it.")
@storage_option
def compare(stores: tuple[str, ...], out_dir: str, analyses: str | None, params: tuple[str, ...], force: bool,
            scheduler: str | None, results: str | None, storage_options: tuple[str, ...]) -> None:
    """Compare models on relative depth l / L: one figure per analysis, one line per store, and a table."""
    from depthcache.analyze.compare import compare as run_compare

    done = run_compare(stores, out_dir, [a.strip() for a in analyses.split(",")] if analyses else None,
                       parse_params(params), force=force, scheduler_address=scheduler, results_dir=results,
                       storage_options=parse_params(storage_options))
    click.echo(done.summary)
    for path in [*done.figures, *done.files]:
        click.echo(str(path))


def locate_options(command: Any) -> Any:
    """The options ``erase`` and ``igrad`` share: one prompt or a task, output store, model and device."""
    return options(
        click.option("--prompt", default=None, help="The prompt, e.g. '5+7+5+3+1+7='."),
        click.option("--answer", default=None, help="Its answer, a token continuation of the prompt, e.g. '28'."),
        task_options(required=False, seed=False),
        click.option("--out", required=True, help="Location-map store to write (a folder ending in .zarr)."),
        click.option("--layers", default="all", show_default=True, help="Layers to map, e.g. 'all', '0-5,20'."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run from OUT.partial (each finished layer is saved there)."),
        click.option("--final-residual/--no-final-residual", default=None,
                     help="Also map the final residual (after the last layer, before the final norm) as row L, as the "
                          "paper does. [default: no; yes with --paper]"),
        click.option("--paper", is_flag=True,
                     help="Take the paper's choice for every option of the measure left unset (docs/analyses.md, "
                          "'Ours and the paper's'); the plan line printed first says which."),
        model_options(batch_size=64, unit="Sequences (erase: erased positions; igrad: points on the path)"))(command)


def run_locate(kind: str, kw: dict[str, Any]) -> Any:
    """Print the plan (the measure's choices; not with --no-progress), then compute and write the ``kind`` map."""
    from depthcache.locate import LocateOptions, locate
    from depthcache.locate.run import check_options, plan

    opts = LocateOptions(**placement_from(kw))
    check_options(kind, opts)
    if opts.progress is not False:  # --no-progress silences the plan line as well as the progress
        click.echo(plan(kind, opts), err=True)
    return locate(kind, opts)


@main.command()
@locate_options
@click.option("--reference", default=None,
              help="Activation store of the same model whose mean resid_pre (positions >= 1) is the erased value "
                   "(default: the mean over --reference-windows windows of pydoc-topics).")
@click.option("--reference-windows", default=8, show_default=True, type=int,
              help="Without --reference: 128-token pydoc-topics windows averaged for the mean residual.")
@click.option("--measure", type=click.Choice(["answer-prob", "distribution-l2"]), default=None,
              help="answer-prob: max over answer tokens of |change of its probability|; distribution-l2 (the "
                   "paper's): max over the positions predicting them of the L2 distance between the whole next-token "
                   "distributions. [default: answer-prob; distribution-l2 with --paper]")
@click.option("--include-first/--exclude-first", default=None,
              help="Include position 0 (the attention sink, an outlier norm) in the mean residual, as the paper "
                   "does. [default: exclude; include with --paper]")
def erase(**kw: Any) -> None:
    """Residual erasure: replace each (layer, position) residual by the layer's mean, record how the output changes
    (max |Δ p(answer)|, or the paper's L2 distance of the distributions)."""
    ds = run_locate("erasure", kw)
    click.echo(f"{kw['out']}: erasure map, {ds.sizes['layer']} layers x {ds.sizes['position']} positions"
               + (f" x {ds.sizes['item']} items" if "item" in ds.dims else ""))


@main.command()
@locate_options
@click.option("--steps", default=None, type=int,
              help="Equal intervals of each layer's path integral (steps + 1 points, evaluated --batch-size at a time "
                   "in one forward/backward pass): where adaptive refinement starts, or the left Riemann sum's count. "
                   "[default: 64; 256 with --paper]")
@click.option("--tolerance", default=0.01, show_default=True, type=float,
              help="Bisect the intervals with the largest completeness error until |sum(attribution) - (f(h) - "
                   "f(baseline))| is at most this times max(|f(h) - f(baseline)|, 0.01).")
@click.option("--max-steps", default=4096, show_default=True, type=int,
              help="Most intervals per layer after refinement (= --steps: no refinement).")
@click.option("--rule", type=click.Choice(["adaptive-trapezoid", "left-riemann"]), default=None,
              help="adaptive-trapezoid: trapezoids refined until --tolerance holds; left-riemann (the paper's): the "
                   "derivative at the left end of each of --steps equal intervals, no refinement (--tolerance and "
                   "--max-steps unused). [default: adaptive-trapezoid; left-riemann with --paper]")
@click.option("--baseline-positions", type=click.Choice(["prompt", "sequence"]), default=None,
              help="The baseline is the layer's mean over these positions, put at every position: the prompt's, or "
                   "the whole sequence's (prompt + every answer token, the paper's). "
                   "[default: prompt; sequence with --paper]")
@click.option("--site", default="resid", show_default=True,
              help="What is interpolated and attributed: the residual entering each layer (resid), or what the "
                   "layer's attention (attn) or MLP (mlp) adds to it (the paper shows all three), or what one branch "
                   "module adds where a layer has several of a kind (e.g. mamba for Falcon-H1).")
def igrad(**kw: Any) -> None:
    """Integrated gradients at every (layer, position) of the residual (or the attention or MLP outputs), with a
    completeness check per layer."""
    from depthcache.locate.igrad import completeness_error

    ds = run_locate("igrad", kw)
    error = completeness_error(ds)
    click.echo(f"{kw['out']}: igrad map, {ds.sizes['layer']} layers x {ds.sizes['position']} positions"
               + (f" x {ds.sizes['item']} items" if "item" in ds.dims else "")
               + f"; {int(ds.intervals.min())}-{int(ds.intervals.max())} intervals per layer; completeness: max "
               f"|sum(attribution) - (f(h) - f(baseline))| / max(|f(h) - f(baseline)|, 0.01) = {error:.3g}")
    if error > kw["tolerance"] and ds.attrs["depthcache_map"]["rule"] == "adaptive-trapezoid":
        click.echo(f"warning: completeness {error:.3g} is above --tolerance {kw['tolerance']} where --max-steps "
                   f"{kw['max_steps']} was reached; raise --max-steps before reading magnitudes there", err=True)
    elif error > kw["tolerance"]:
        click.echo(f"note: completeness {error:.3g} with the left Riemann sum, which does not refine; --rule "
                   "adaptive-trapezoid refines until --tolerance holds", err=True)


@main.command(name="hop-depth")
@task_options(required=True, seed=False)
@click.option("--out", required=True, help="Map store to write (a folder ending in .zarr).")
@click.option("--per-hops", default=None, type=click.IntRange(min=1),
              help="Only the first N items of each hop count (the paper used 20). [default: all]")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from OUT.partial (each finished skip is saved there).")
@model_options(batch_size=32, unit="Skipped layers of one item (one batch row each)")
def hop_depth(**kw: Any) -> None:
    """The paper's multi-hop depth score, from the model: per item, skip each layer at the prompt's positions only,
    measure at the answer's; per hop count the max over items and the centre of mass over skipped layers (`analyze
    multihop` is depthcache's own score, from a store's skip runs)."""
    from depthcache.locate.hops import HopDepthOptions, hop_depth

    ds = hop_depth(HopDepthOptions(**placement_from(kw)))
    scores = ", ".join(f"{h} hops: {later * ds.sizes['layer']:.2f} / {out * ds.sizes['layer']:.2f}"
                       for h, later, out in zip(ds.hops.values, ds.depth_score_later_max.values,
                                                ds.depth_score_output_max.values))
    click.echo(f"{kw['out']}: {ds.sizes['item']} items x {ds.sizes['skipped_layer']} skipped layers; depth score "
               f"(layers; later-layer effect / output effect, max over items): {scores}")


def copy_and_report(source: str, destination: str, jobs: int, options: dict[str, Any], push: bool,
                    progress: bool | None) -> None:
    """Run a push or pull and print what it did; a failed verification is an error saying whose it is."""
    from depthcache.sharing import copy_store

    kw = {"destination_options": options} if push else {"source_options": options}
    report = copy_store(source, destination, jobs=jobs, progress=progress, **kw)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        advice = (f"the source has the same problem: repair or re-extract {source} (depthcache validate lists it)"
                  if report.source_damaged else "run the same command again to finish the copy")
        raise DepthcacheError(f"{destination} failed verification after the copy: {report.problems[0]}{more}; "
                              f"{advice}")
    repaired = f", {report.repaired} damaged at the destination fetched again" if report.repaired else ""
    click.echo(f"{destination}: {report.copied} objects copied ({report.bytes_copied / 2**20:,.1f} MiB), "
               f"{report.skipped} already there{repaired}; every chunk verified: {report.verified} "
               f"({report.seconds:.1f} s)")
    if report.ignored:
        click.echo(f"note: {len(report.ignored)} source object(s) whose names cannot be store keys were not copied "
                   f"(first: {report.ignored[0][:200]!r})")
    for note in report.notes:
        click.echo(f"note: {note}")


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
@click.argument("source")
@click.argument("destination")
@click.option("--shard-mib", default=256, show_default=True, type=click.IntRange(1, 1024),
              help="Target size of one shard of the new store (as for extract).")
@progress_option
def upgrade(source: str, destination: str, shard_mib: int, progress: bool | None) -> None:
    """Rewrite a schema 1.x store as 2.0 (sharded: one layer is read without the others) into a new folder, every
    chunk's checksum verified on the way and the result validated; the source is left as it is."""
    from depthcache.extraction.upgrade import upgrade_store

    attrs = upgrade_store(source, destination, shard_mib, progress)
    click.echo(f"{destination}: schema {attrs['schema_version']}, {attrs['layout']['n_tokens']:,} tokens in "
               f"{attrs['layout']['chunk_tokens']:,}-token shards, validated")


@main.command()
@click.argument("store")
@click.option("--out", default=None, help="HTML file to write (default: STORE's name + .html).")
@results_option
@storage_option
def report(store: str, out: str | None, results: str | None, storage_options: tuple[str, ...]) -> None:
    """One self-contained HTML page: the store's provenance and every analysis cached for it, with figures."""
    from depthcache.report import write_report
    from depthcache.store.io import local_name

    path = write_report(store, out or str(local_name(store).with_suffix(".html")), parse_params(storage_options),
                        results)
    click.echo(str(path))


@main.command(name="prune-copy")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=f"The model to copy. {MODEL_HELP}")
@click.option("--keep", default="every-other", show_default=True,
              help=f"Layers to keep: 'every-other' (0, 2, 4, ...) or a {LAYERS_HELP}.")
@click.option("--out", required=True, help="New folder for the pruned Hugging Face model (loads with --model OUT).")
def prune_copy(model: str, keep: str, out: str) -> None:
    """Save a copy of a model with layers removed (same tokenizer), e.g. a shallow model for layer-map."""
    from depthcache.model import prune_copy as make_copy

    click.echo(f"{make_copy(model, keep, out)}: pruned copy of {model} (kept layers: {keep})")


@main.command(name="lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                               "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval(args: tuple[str, ...]) -> None:
    """lm-evaluation-harness's command line with the 'depthcache' backend: --model depthcache --model_args
    pretrained=smollm2-135m,remove=20-29 --tasks TASK --include_path FOLDER (needs depthcache[harness])."""
    try:
        from depthcache.evaluate.harness import main as harness_main
    except ImportError as exc:
        raise DepthcacheError("lm-eval is not installed: pip install 'depthcache[harness]'") from exc
    harness_main(list(args))


@main.group()
def evaluate() -> None:
    """Score a model on a task with parts of it removed (likelihood- vs generation-based evaluation)."""


@evaluate.command()
@task_options(required=False, seed=True)
@click.option("--harness", default=None,
              help="Score with lm-evaluation-harness instead of --task: local task YAMLs or task names under "
                   "--include-path, comma-separated (needs depthcache[harness]; --n limits the harness's documents).")
@click.option("--include-path", default=None, help="With --harness: a folder of local harness task YAMLs.")
@click.option("--layers", default="all", show_default=True, help=f"Candidate layers to remove: a {LAYERS_HELP}.")
@click.option("--metric", "metrics", default="likelihood,generation", show_default=True,
              help="likelihood (gold log-prob, accuracy among choices) and/or generation (greedy, exact match).")
@click.option("--order", default="last-first", show_default=True,
              type=click.Choice(["last-first", "first-first", "influence", "greedy"]),
              help="Removal order: by depth, by block influence 1 - cos(h_l, h_l+1) (lowest first), or greedy "
                   "(the least harmful next layer by gold log-prob; costs one likelihood pass per candidate).")
@click.option("--steps", default=None, type=int, help="Most layers removed (default: every candidate).")
@click.option("--max-new-tokens", default=16, show_default=True, type=int, help="Greedy decoding length limit.")
@model_options(batch_size=16, unit="Items", progress=False)
@click.option("--out", default=None,
              help="Folder for prune.zarr, prune.csv, prune-items.csv and prune.png (default: runs/prune-TASK).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from OUT/prune.partial (each finished step is saved there).")
@progress_option
def prune(**kw: Any) -> None:
    """Remove more and more layers and score a task by likelihood and by generation at each step."""
    from pathlib import Path

    from depthcache.evaluate import PruneOptions, evaluate_prune

    kw["out"] = kw["out"] or f"runs/prune-{Path(kw['task'] or (kw['harness'] or 'task').split(',')[0]).stem}"
    ds = evaluate_prune(PruneOptions(**placement_from(kw)))
    if kw["harness"]:
        click.echo(ds.to_dataframe().to_string())
        click.echo(f"written to {kw['out']}/ (prune-harness.zarr, prune-harness.csv)")
        return
    click.echo(ds[["n_removed", "removed_layer", "mean_gold_logprob", "choice_accuracy",
                   "exact_match_rate"]].to_dataframe().to_string())
    click.echo(f"written to {kw['out']}/ (prune.zarr, prune.csv, prune-items.csv, prune.png)")


@evaluate.command(name="compare")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder for prune-compare.png, prune-compare.csv and prune-compare.md.")
def compare_pruning(runs: tuple[str, ...], out: str) -> None:
    """Pruning runs (evaluate prune output folders) of one or more models side by side on the fraction of layers
    removed: a figure and a table of how many layers each metric survives (keeps half its full-model score)."""
    from depthcache.evaluate.compare import compare_pruning as run_comparison

    text, paths = run_comparison(list(runs), out)
    click.echo(text)
    click.echo(f"written: {', '.join(str(p) for p in paths)}")


from depthcache.cli_map_stats import map_stats, merge_stats  # noqa: E402 - commands in their own module

main.add_command(map_stats)
main.add_command(merge_stats)

from depthcache.cli_categories import categories, categories_report  # noqa: E402 - commands in their own module

evaluate.add_command(categories)
evaluate.add_command(categories_report)


if __name__ == "__main__":
    main()
