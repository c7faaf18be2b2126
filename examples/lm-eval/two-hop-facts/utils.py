"""lm-evaluation-harness hooks for depthcache task files: the data is the .jsonl beside this file."""

from pathlib import Path

from depthcache.evaluate.harness import generation_results, likelihood_results, task_dataset


def load(data_file, **_):
    return task_dataset(Path(__file__).with_name(data_file))


process_generation = generation_results
process_likelihood = likelihood_results
