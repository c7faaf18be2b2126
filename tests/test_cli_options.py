"""One consistent command line: shared options mean the same everywhere, --help stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from depthcache.cli import main
from depthcache.defaults import DEFAULT_MODEL

MODEL_COMMANDS = (("extract",), ("erase",), ("igrad",), ("evaluate", "prune"))
TASK_COMMANDS = (("erase",), ("igrad",), ("evaluate", "prune"))


def command(*path: str) -> click.Command:
    """The click command at ``path`` below the main group."""
    found: click.Command = main
    for name in path:
        found = found.get_command(click.Context(found), name)  # type: ignore[union-attr]
    return found


def option(cmd: click.Command, name: str) -> click.Option:
    """The option ``--name`` of a command."""
    return next(p for p in cmd.params if isinstance(p, click.Option) and f"--{name}" in p.opts)


def test_model_device_and_task_options_are_one_definition():
    for path in MODEL_COMMANDS:
        cmd = command(*path)
        assert option(cmd, "model").default == DEFAULT_MODEL
        assert option(cmd, "device").help == option(command("extract"), "device").help
        assert "per forward pass" in option(cmd, "batch-size").help
    for path in TASK_COMMANDS:
        cmd = command(*path)
        n = option(cmd, "n")
        assert n.default is None and "items" in n.help and "task:NAME?n=N" in n.help  # the task's own size
        assert option(cmd, "task").help == option(command("erase"), "task").help
    assert "n counts items" in option(command("extract"), "data").help
    for path in (("extract",), ("evaluate", "prune")):
        assert "layer spec" in option(command(*path), "layers").help


def test_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from depthcache.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); r2 = CliRunner().invoke(main, ['extract', '--help']); "
            "assert r.exit_code == r2.exit_code == 0; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_usage_lines_name_the_arguments():
    runner = CliRunner()
    assert "analyze contributions [OPTIONS] STORE\n" in runner.invoke(main, ["analyze", "contributions", "--help"]).output
    assert "analyze layer-map [OPTIONS] SHALLOW DEEP | STATS\n" in runner.invoke(main, ["analyze", "layer-map", "--help"]).output
    assert "plot [OPTIONS] NAME STORE\n" in runner.invoke(main, ["plot", "--help"]).output
    assert "depthcache plot contributions runs/demo.zarr" in runner.invoke(main, ["--help"]).output
