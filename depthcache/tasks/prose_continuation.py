"""``prose-continuation``: the next words of real English sentences from Python's ``pydoc_data.topics``."""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from depthcache.tasks.base import (
    N_DISTRACTORS,
    TaskItem,
    item_rng,
    require_int,
    subset_indices,
    with_distractors,
)

DESCRIPTION = ("the next few words of a sentence from Python's own documentation (pydoc_data.topics), after up to two "
               "preceding sentences; option words=3")
DEFAULT_SEED = 0
DEFAULT_N = 200
MIN_WORDS = 12
MIN_PROMPT_WORDS = 5
CONTEXT_SENTENCES = 2
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
PLAIN_SENTENCE = re.compile(r"[A-Za-z0-9 ,;:'\"()\-]+\.")
UNDERLINE = re.compile(r"[*=\-^~]+")


@dataclass(frozen=True)
class Sentence:
    """A plain prose sentence of one topic and the sentences before it in its paragraph."""

    topic: str
    index: int
    context: tuple[str, ...]
    text: str


def prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of unindented prose (no code, tables, lists or headings), each joined onto one line."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if all(line and not line[0].isspace() for line in lines) and not UNDERLINE.fullmatch(lines[-1]):
            yield " ".join(line.strip() for line in lines)


def topic_sentences(topic: str, text: str) -> list[Sentence]:
    """The usable sentences of one topic: plain characters only, at least ``MIN_WORDS`` words."""
    found: list[Sentence] = []
    for paragraph in prose_paragraphs(text):
        parts = SENTENCE_END.split(paragraph)
        for i, part in enumerate(parts):
            if len(part.split()) >= MIN_WORDS and PLAIN_SENTENCE.fullmatch(part):
                context = tuple(parts[max(0, i - CONTEXT_SENTENCES):i])
                found.append(Sentence(topic, len(found), context, part))
    return found


def corpus() -> list[Sentence]:
    """Every usable sentence of ``pydoc_data.topics`` in sorted topic order, each distinct text once."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    sentences = []
    for topic in sorted(topics):
        for sentence in topic_sentences(topic, topics[topic]):
            if sentence.text not in seen:
                seen.add(sentence.text)
                sentences.append(sentence)
    return sentences


def span(words: list[str], start: int, count: int) -> str:
    """``count`` words from ``start`` written as an answer (leading space)."""
    return " " + " ".join(words[start:start + count])


def foreign_spans(answer: str, others: list[list[str]], words: int, rng: random.Random) -> list[str]:
    """``N_DISTRACTORS`` distinct mid-sentence spans of ``words`` words from ``others``, none equal to ``answer``."""
    spans: dict[str, None] = {}
    while len(spans) < N_DISTRACTORS:
        other = rng.choice(others)
        candidate = span(other, rng.randint(1, len(other) - words), words)
        if candidate != answer:
            spans[candidate] = None
    return list(spans)


def prose_item(sentence: Sentence, others: list[list[str]], words: int, seed: int) -> TaskItem:
    """One sentence cut after a seeded word; the choices are spans from sentences of other topics."""
    item_id = f"prose-{sentence.topic}-{sentence.index:03d}"
    rng = item_rng(seed, item_id)
    tokens = sentence.text.split()
    cut = rng.randint(MIN_PROMPT_WORDS, len(tokens) - words)
    answer = span(tokens, cut, words)
    choices = with_distractors(answer, foreign_spans(answer, others, words, rng), rng)
    return TaskItem(id=item_id, prompt=" ".join([*sentence.context, *tokens[:cut]]), answer=answer, choices=choices,
                    hops=1, meta={"topic": sentence.topic, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"})


def generate(n: int | None, seed: int, words: int = 3) -> list[TaskItem]:
    """``n`` seeded sentences (in corpus order) whose answer is the ``words`` words after a seeded cut."""
    require_int("words", words, 1, MIN_WORDS - MIN_PROMPT_WORDS)
    sentences = corpus()
    chosen = [sentences[i] for i in subset_indices(len(sentences), DEFAULT_N if n is None else n, seed,
                                                     "prose sentences")]
    return [prose_item(sentence, [s.text.split() for s in sentences if s.topic != sentence.topic], words, seed)
            for sentence in chosen]
