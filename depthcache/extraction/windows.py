"""Documents and the deterministic fixed-length token windows a model reads (the extraction's unit of input)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from depthcache.errors import DepthcacheError


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



def make_windows(token_docs: Iterable[list[int]], seq_len: int, bos_id: int | None,
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



def tokenize_documents(tokenizer, docs: Documents) -> Iterator[list[int]]:  # noqa: ANN001 - any HF tokenizer
    """Token ids of each document, without special tokens (BOS is added per window), tokenized as they are asked
    for: make_windows stops at ``max_tokens``, so the documents after it are never tokenized."""
    return (list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in docs.texts)



def bos_token_id(tokenizer) -> int | None:  # noqa: ANN001 - any HF tokenizer
    """The BOS id if the tokenizer prepends one by default (the model was trained with it), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None
