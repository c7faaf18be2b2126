"""Text datasets (built-in, files, folders, JSONL, tasks) → documents."""

from __future__ import annotations

import json
from pathlib import Path

from depthcache.errors import DepthcacheError
from depthcache.extraction.task_data import load_task_documents
from depthcache.extraction.windows import Documents
from depthcache.textio import read_text

DEFAULT_DATASET = "pydoc-topics"
BUILTIN_DATASETS = {"pydoc-topics": "Python's own documentation topics (pydoc_data.topics): ~465k characters "
                                    "of real English prose that ships with Python"}


def load_documents(spec: str) -> Documents:
    """A built-in dataset name, a .txt file, a folder of .txt files, a JSONL file with a ``text`` field, or a task
    (``task:NAME[?n=60&seed=0&option=value]``: one document per item, prompt + answer)."""
    if spec.startswith("task:"):
        return load_task_documents(spec)
    if spec == "pydoc-topics":
        from pydoc_data.topics import topics

        return Documents(spec, tuple(topics[key] for key in sorted(topics)))
    path = Path(spec).expanduser()
    if not path.exists():
        raise DepthcacheError(f"no dataset {spec!r}: give a .txt file, a folder of .txt files, a .jsonl file "
                              f"with a 'text' field, a task (task:two-hop-facts, task:FILE.jsonl), or one of: "
                              f"{', '.join(BUILTIN_DATASETS)}")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        docs = tuple(read_text(f) for f in files)
    elif path.suffix == ".jsonl":
        docs = tuple(_jsonl_texts(path))
    else:
        docs = (read_text(path),)
    docs = tuple(d for d in docs if d.strip())
    if not docs:
        raise DepthcacheError(f"dataset {spec!r} holds no text")
    return Documents(str(path), docs)


def _jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a JSONL file, with the line number of any bad line."""
    texts = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DepthcacheError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise DepthcacheError(f"{path}:{number}: JSON nested too deeply") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DepthcacheError(f"{path}:{number}: each line needs a string field 'text'")
        texts.append(record["text"])
    return texts


