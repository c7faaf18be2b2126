"""Text datasets → documents → deterministic fixed-length token windows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from depthcache.errors import DepthcacheError

DEFAULT_DATASET = "pydoc-topics"
BUILTIN_DATASETS = {"pydoc-topics": "Python's own documentation topics (pydoc_data.topics): ~465k characters "
                                    "of real English prose that ships with Python"}


@dataclass(frozen=True)
class Documents:
    """A named list of documents with a content hash (provenance)."""

    name: str
    texts: tuple[str, ...]

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()


@dataclass(frozen=True)
class Window:
    """One model input: ``tokens`` of document ``doc_id``; ``next_token`` follows it in the document (-1: none).

    Task windows (one task item each) also say where the answer starts in ``tokens`` and the item's hops."""

    doc_id: int
    tokens: tuple[int, ...]
    next_token: int
    answer_start: int | None = None
    hops: int | None = None


def load_documents(spec: str) -> Documents:
    """A built-in dataset name, a .txt file, a folder of .txt files, a JSONL file with a ``text`` field, or a task
    (``task:NAME[?n=60&seed=0&option=value]``: one document per item, prompt + answer)."""
    if spec.startswith("task:"):
        from depthcache.extract.task_data import load_task_documents  # imports this module

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
        docs = tuple(f.read_text(encoding="utf-8") for f in files)
    elif path.suffix == ".jsonl":
        docs = tuple(_jsonl_texts(path))
    else:
        docs = (path.read_text(encoding="utf-8"),)
    docs = tuple(d for d in docs if d.strip())
    if not docs:
        raise DepthcacheError(f"dataset {spec!r} holds no text")
    return Documents(str(path), docs)


def _jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a JSONL file, with the line number of any bad line."""
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DepthcacheError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DepthcacheError(f"{path}:{number}: each line needs a string field 'text'")
        texts.append(record["text"])
    return texts


def make_windows(token_docs: list[list[int]], seq_len: int, bos_id: int | None,
                 max_tokens: int | None = None) -> list[Window]:
    """Split each document into windows of at most ``seq_len`` tokens, each starting with BOS if the model uses one.

    Windows never cross documents (so position 0 is always a sequence start); the total is cut at ``max_tokens``.
    """
    body = seq_len - (bos_id is not None)
    if body < 1:
        raise DepthcacheError(f"--seq-len {seq_len} is too short")
    windows: list[Window] = []
    total = 0
    for doc_id, ids in enumerate(token_docs):
        for start in range(0, len(ids), body):
            piece = ids[start:start + body]
            tokens = ((bos_id,) if bos_id is not None else ()) + tuple(piece)
            following = ids[start + body] if start + body < len(ids) else -1
            if max_tokens is not None and total + len(tokens) >= max_tokens:
                cut = max_tokens - total
                if cut > 0:
                    windows.append(Window(doc_id, tokens[:cut], tokens[cut] if cut < len(tokens) else following))
                return windows
            windows.append(Window(doc_id, tokens, following))
            total += len(tokens)
    return windows


def tokenize_documents(tokenizer, docs: Documents) -> list[list[int]]:  # noqa: ANN001 - any HF tokenizer
    """Token ids of each document, without special tokens (BOS is added per window)."""
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in docs.texts]


def bos_token_id(tokenizer) -> int | None:  # noqa: ANN001 - any HF tokenizer
    """The BOS id if the tokenizer prepends one by default (the model was trained with it), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None
