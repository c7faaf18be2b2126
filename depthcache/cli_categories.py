"""The pruning-by-category commands: ``evaluate categories`` (one pruning run per task category) and
``evaluate categories-report`` (the figure and the table with bootstrap intervals)."""

from __future__ import annotations

from typing import Any

import click

from depthcache.defaults import DEFAULT_MODEL


@click.command(name="categories")
@click.option("--categories", default="all", show_default=True,
              help="Comma-separated: retrieval, knowledge, reasoning, coherence (all: these four, plus gsm8k with "
                   "--gsm8k).")
@click.option("--gsm8k", default=None, help="A local GSM8K-style JSONL file (question, answer '... #### N'): adds "
                                            "the category gsm8k.")
@click.option("--n", default=40, show_default=True, type=click.IntRange(min=1), help="Items per category.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of every category's "
                                                                                       "items.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Alias, local HF folder, .gguf file or hub id.")
@click.option("--layers", default="all", show_default=True, help="Candidate layers to remove (e.g. '0-5,10').")
@click.option("--order", default="last-first", show_default=True,
              type=click.Choice(["last-first", "first-first", "influence", "greedy"]), help="Removal order.")
@click.option("--steps", default=None, type=int, help="Most layers removed (default: every candidate).")
@click.option("--max-new-tokens", default=8, show_default=True, type=int, help="Greedy decoding length limit.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Items per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", required=True, help="Folder for one evaluate-prune run per category (OUT/<category>); "
                                           "finished ones are kept, an interrupted one resumes.")
@click.option("--progress/--no-progress", default=None, help="Progress per step (default: on a terminal, a bar).")
def categories(**kw: Any) -> None:
    """Prune a model step by step and score each task category by likelihood and by generation."""
    from depthcache.evaluate.categories import parse_categories, run_categories
    from depthcache.evaluate.prune import PruneOptions

    chosen = parse_categories(kw.pop("categories"), kw["gsm8k"])
    gsm8k = kw.pop("gsm8k")
    folders = run_categories(PruneOptions(task="category", **kw), chosen, gsm8k)
    click.echo(f"written: {', '.join(map(str, folders))} (evaluate categories-report {' '.join(map(str, folders))} "
               "--out DIR draws them)")


@click.command(name="categories-report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder for prune-categories.png, .csv and .md.")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(min=100),
              help="Bootstrap resamples of the items.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the resamples.")
@click.option("--share", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="A category can lose k layers while every step up to k keeps this share of its full score.")
def categories_report(runs: tuple[str, ...], out: str, resamples: int, seed: int, share: float) -> None:
    """Category runs (evaluate categories OUT/<category> folders, any models and orders): accuracy against layers
    removed with bootstrap bands, and the layers each category can lose, with intervals."""
    from depthcache.evaluate.categories import category_report

    text, paths = category_report(list(runs), out, resamples, seed, share)
    click.echo(text)
    click.echo(f"written: {', '.join(str(p) for p in paths)}")
