"""Task datasets: built-in seeded generators and user JSONL files, all as lists of ``TaskItem``.

Built-in answers carry the leading space that separates them from the prompt (``prompt + answer`` is natural
text) and every prompt ends without whitespace; see ``data/README.md`` for each task's format, seed and size.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType

from depthcache.errors import DepthcacheError
from depthcache.tasks import (
    addition,
    arithmetic_chain,
    prose_continuation,
    retrieval,
    two_hop_facts,
)
from depthcache.tasks.base import TaskItem, require_int, subset_indices
from depthcache.tasks.jsonl import read_task_jsonl, write_task_jsonl

__all__ = ["TASKS", "TaskItem", "load_task", "read_task_jsonl", "write_task_jsonl"]

BUILTIN: dict[str, ModuleType] = {
    "addition": addition,
    "arithmetic-chain": arithmetic_chain,
    "two-hop-facts": two_hop_facts,
    "prose-continuation": prose_continuation,
    "retrieval": retrieval,
}
TASKS: dict[str, str] = {name: module.DESCRIPTION for name, module in BUILTIN.items()}
FILE_SEED = 0


def task_options(name: str) -> dict[str, object]:
    """The options a built-in task accepts beyond n and seed, with their defaults."""
    parameters = inspect.signature(BUILTIN[name].generate).parameters
    return {key: p.default for key, p in parameters.items() if key not in ("n", "seed")}


def load_builtin(name: str, n: int | None, seed: int | None, options: dict[str, object]) -> list[TaskItem]:
    """Items of a built-in task after checking that its options exist."""
    accepted = task_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        offer = ", ".join(f"{key} (default {value!r})" for key, value in accepted.items()) or "none"
        raise DepthcacheError(f"task {name!r} has no option {', '.join(map(repr, unknown))}; its options: {offer}")
    module = BUILTIN[name]
    return module.generate(n, module.DEFAULT_SEED if seed is None else seed, **options)


def load_task(name_or_path: str | Path, n: int | None = None, seed: int | None = None,
              **options: object) -> list[TaskItem]:
    """Items of a built-in task (by name, with its options) or of a .jsonl task file (a seeded subset when n is set)."""
    if n is not None:
        require_int("n", n, 1)
    if seed is not None:
        require_int("seed", seed, 0)
    if isinstance(name_or_path, str) and name_or_path in BUILTIN:
        return load_builtin(name_or_path, n, seed, options)
    path = Path(name_or_path).expanduser()
    if path.suffix != ".jsonl":
        raise DepthcacheError(f"unknown task {str(name_or_path)!r}: use a built-in task ({', '.join(TASKS)}) "
                              f"or the path of a .jsonl task file")
    if options:
        raise DepthcacheError(f"task files take no options, got {', '.join(sorted(options))}; pass only n and seed")
    items = read_task_jsonl(path)
    return [items[i] for i in subset_indices(len(items), n, FILE_SEED if seed is None else seed, f"items in {path}")]
