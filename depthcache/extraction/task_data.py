"""Task datasets as extraction input: one window per item (prompt + gold answer), with its answer positions and hops.

``--data task:NAME[?key=value&key=value]`` names a built-in task of ``depthcache.tasks`` or a task file
(``task:path/to/items.jsonl``); the query string carries ``n``, ``seed`` and the task's own options, e.g.
``task:two-hop-facts?n=60`` or ``task:arithmetic-chain?n=40&max_ops=3``. Each item becomes exactly one window
(BOS if the tokenizer adds one, the prompt's tokens, then the answer's tokens), never packed with another item and
never split; the answer's tokens must be exactly what the tokenizer gives for ``prompt + answer`` after the
prompt's own tokens. Schema 1.2 stores the per-token arrays ``item``, ``answer_index`` and ``hops``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from depthcache.errors import DepthcacheError
from depthcache.extraction.windows import Documents, Window, bos_token_id
from depthcache.tasks import BUILTIN, FILE_SEED, TaskItem, load_task

TASK_PREFIX = "task:"
ITEM_FIELDS = ("id", "prompt", "answer", "hops", "meta")
SHOWN_PROBLEMS = 5


@dataclass(frozen=True)
class TaskDocuments(Documents):
    """A task's items as documents (``prompt + answer`` each), with the task's name and options (provenance)."""

    items: tuple[TaskItem, ...] = ()
    task: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def sha256(self) -> str:
        """Hash of every item's full record (id, prompt, answer, choices, hops, meta), in order."""
        digest = hashlib.sha256()
        for item in self.items:
            record = {"id": item.id, "prompt": item.prompt, "answer": item.answer, "choices": list(item.choices),
                      "hops": item.hops, "meta": item.meta}
            data = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()


def parse_task_spec(spec: str) -> tuple[str, dict[str, object]]:
    """'task:NAME?n=60&max_ops=3' → ('NAME', {'n': 60, 'max_ops': 3}); integer-looking values become ints."""
    name, _, query = spec.removeprefix(TASK_PREFIX).partition("?")
    if not name:
        raise DepthcacheError(f"--data {spec!r} names no task: use e.g. task:two-hop-facts, task:arithmetic-chain?n=40 "
                              "or task:path/to/items.jsonl")
    params: dict[str, object] = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DepthcacheError(f"bad task option {pair!r} in --data {spec!r}: use task:NAME?key=value&key=value")
        params[key] = int(value) if re.fullmatch(r"-?[0-9]+", value) else value
    return name, params


def load_task_documents(spec: str) -> TaskDocuments:
    """The items of ``task:NAME[?options]`` as documents, with the task's name, n, seed and options recorded."""
    name, params = parse_task_spec(spec)
    n, seed = params.pop("n", None), params.pop("seed", None)
    items = load_task(name, n=n, seed=seed, **params)
    default_seed = BUILTIN[name].DEFAULT_SEED if name in BUILTIN else FILE_SEED
    task = {"name": name, "n": n, "seed": default_seed if seed is None else seed, "options": params}
    return TaskDocuments(spec, tuple(i.prompt + i.answer for i in items), items=tuple(items), task=task)


def item_tokens(tokenizer: Any, item: TaskItem) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt tokens, answer tokens) of an item, where the answer's tokens continue the prompt's exactly."""
    prompt = tuple(tokenizer(item.prompt, add_special_tokens=False)["input_ids"])
    full = tuple(tokenizer(item.prompt + item.answer, add_special_tokens=False)["input_ids"])
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        raise DepthcacheError(
            f"task item {item.id!r}: the tokens of prompt + answer do not start with the prompt's own tokens (the "
            f"tokenizer merges across ...{item.prompt[-12:]!r} | {item.answer[:12]!r}...), so the answer is not a "
            "token continuation of the prompt: end the prompt at a token boundary (e.g. put the separating space "
            "at the start of the answer) or drop the item")
    return prompt, full[len(prompt):]


def task_windows(tokenizer: Any, items: tuple[TaskItem, ...], seq_len: int, max_tokens: int | None) -> list[Window]:
    """One window per item (BOS if the model uses one, prompt, answer); refuses items longer than ``seq_len``."""
    bos = bos_token_id(tokenizer)
    windows, too_long = [], []
    for index, item in enumerate(items):
        prompt, answer = item_tokens(tokenizer, item)
        tokens = ((bos,) if bos is not None else ()) + prompt + answer
        if len(tokens) > seq_len:
            too_long.append(f"{item.id!r} ({len(tokens)} tokens)")
        windows.append(Window(index, tokens, -1, len(tokens) - len(answer), item.hops))
    if too_long:
        more = f" and {len(too_long) - SHOWN_PROBLEMS} more" if len(too_long) > SHOWN_PROBLEMS else ""
        raise DepthcacheError(f"task item(s) {', '.join(too_long[:SHOWN_PROBLEMS])}{more} are longer than --seq-len "
                              f"{seq_len}: each item is one window and is never split; raise --seq-len to at least "
                              f"{max(len(w.tokens) for w in windows)}")
    total = sum(len(w.tokens) for w in windows)
    if max_tokens is not None and total > max_tokens:
        raise DepthcacheError(f"the task's {len(items)} items take {total:,} tokens, more than --max-tokens "
                              f"{max_tokens:,}: raise --max-tokens (0: no limit) or ask for fewer items "
                              "(task:NAME?n=...); items are never cut")
    return windows


def task_columns(windows: list[Window]) -> dict[str, np.ndarray]:
    """Per-token ``item``, ``answer_index`` (k where the next token is answer token k, else -1) and ``hops``."""
    cols: dict[str, list[np.ndarray]] = {"item": [], "answer_index": [], "hops": []}
    for w in windows:
        n = len(w.tokens)
        k = np.arange(1, n + 1) - w.answer_start  # position p predicts token p + 1
        cols["item"].append(np.full(n, w.doc_id, dtype=np.int32))
        cols["answer_index"].append(np.where((k >= 0) & (np.arange(1, n + 1) < n), k, -1).astype(np.int32))
        cols["hops"].append(np.full(n, w.hops, dtype=np.int32))
    return {name: np.concatenate(parts) for name, parts in cols.items()}


def task_attrs(docs: TaskDocuments) -> dict[str, Any]:
    """The dataset attributes a task store adds: the task's name/n/seed/options and every item's metadata."""
    return {"task": docs.task,
            "items": [{key: getattr(item, key) for key in ITEM_FIELDS} for item in docs.items]}
