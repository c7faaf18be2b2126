"""Run a Python module as ``python -m`` would (``timed.py TIMINGS NAME TOKENS MODULE ARGS...``), marking when the
first forward pass of any torch module starts and appending the same timing line as the peer scripts at exit.

This is how ``depthcache extract`` is timed after load without changing it: a global forward pre-hook that removes
itself on its first call (the model's first batch), then nothing more runs per batch.
"""

from __future__ import annotations

import atexit
import runpy
import sys

import torch

from common import Clock


def main() -> None:
    timings, name, tokens, module, *argv = sys.argv[1:]
    clock = Clock()

    def first_call(module: torch.nn.Module, args: tuple) -> None:
        clock.start()
        handle.remove()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(first_call)
    atexit.register(clock.write, timings, name, int(tokens))
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
