"""Click options shared by several command modules (cli.py and the commands in their own modules)."""

from __future__ import annotations

from typing import Any

import click


def options(*decorators: Any) -> Any:
    """Apply click option decorators in the order they are listed (top to bottom, as in --help)."""
    def apply(command: Any) -> Any:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="Progress with ETA (default: a bar on a terminal, else a line per step or per minute on stderr; "
         "--progress forces the bar, --no-progress silences both).")


placement_options = options(
    click.option("--device-map", default=None,
                 help="Spread the model over devices as accelerate does: auto, balanced, balanced_low_0, sequential, "
                      "or a JSON file {module: GPU index | cpu | disk} (default: the whole model on --device; auto when "
                      "--max-memory or --offload-folder is given)."),
    click.option("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                 help="Most weight memory per device for --device-map, e.g. cuda:0=70GiB,cuda:1=70GiB,cpu=100GiB "
                      "(default: each GPU's free memory, 90% of the host's)."),
    click.option("--offload-folder", default=None,
                 help="Folder for the weights beyond --max-memory, read from disk on each forward pass (slow, "
                      "bit-identical)."),
    click.option("--model-dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
                 help="Precision the model computes in (not the stored --dtype). [default: float32 on CPU, bfloat16 "
                      "on CUDA]"))


def placement_from(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with the placement options replaced by one ``placement`` (model.placement.Placement)."""
    from depthcache.model.placement import Placement

    kw["placement"] = Placement(*(kw.pop(name) for name in ("device_map", "max_memory", "offload_folder",
                                                             "model_dtype")))
    return kw
