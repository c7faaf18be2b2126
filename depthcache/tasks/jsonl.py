"""Task files: JSON lines with ``prompt`` and ``answer``, optionally ``id``, ``choices``, ``hops`` and ``meta``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from depthcache.errors import DepthcacheError
from depthcache.tasks.base import TaskItem
from depthcache.textio import read_text

KEYS = ("id", "prompt", "answer", "choices", "hops", "meta")


def item_record(item: TaskItem) -> dict:
    """The JSON object written for one item (every field, choices as a list)."""
    return {"id": item.id, "prompt": item.prompt, "answer": item.answer, "choices": list(item.choices),
            "hops": item.hops, "meta": item.meta}


def write_task_jsonl(items: Iterable[TaskItem], path: str | Path) -> Path:
    """Write ``items`` as a task file that ``load_task`` reads back into equal items; returns the path."""
    path = Path(path).expanduser()
    lines = []
    for item in items:
        try:
            lines.append(json.dumps(item_record(item), ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise DepthcacheError(f"task item {item.id!r}: meta must hold only JSON values ({exc})") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def record_item(record: object, default_id: str) -> TaskItem:
    """The item of one parsed line; a DepthcacheError (without location) says what is wrong with it."""
    if not isinstance(record, dict):
        raise DepthcacheError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(KEYS))
    if unknown:
        raise DepthcacheError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(KEYS)}")
    missing = [key for key in ("prompt", "answer") if key not in record]
    if missing:
        raise DepthcacheError(f"missing required key(s) {', '.join(map(repr, missing))}")
    choices = record.get("choices", [])
    if not isinstance(choices, list):
        raise DepthcacheError(f"'choices' must be a list of strings, got {choices!r}")
    return TaskItem(id=record.get("id", default_id), prompt=record["prompt"], answer=record["answer"],
                    choices=tuple(choices), hops=record.get("hops", 1), meta=record.get("meta", {}))


def read_task_jsonl(path: str | Path) -> list[TaskItem]:
    """Items of a task file; a DepthcacheError names the file, the line and the problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DepthcacheError(f"task file {path} not found: give an existing .jsonl file or a built-in task name")
    items: list[TaskItem] = []
    lines_of: dict[str, int] = {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = record_item(json.loads(line), f"{path.stem}-{number}")
        except json.JSONDecodeError as exc:
            raise DepthcacheError(f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError as exc:
            raise DepthcacheError(f"{path}, line {number}: JSON nested too deeply") from exc
        except DepthcacheError as exc:
            raise DepthcacheError(f"{path}, line {number}: {exc}") from exc
        if item.id in lines_of:
            raise DepthcacheError(f"{path}, line {number}: id {item.id!r} is already used on line {lines_of[item.id]}")
        lines_of[item.id] = number
        items.append(item)
    if not items:
        raise DepthcacheError(f"{path} holds no items: write one JSON object per line with 'prompt' and 'answer'")
    return items
