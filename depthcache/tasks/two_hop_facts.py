"""``two-hop-facts``: the hand-written chains of ``two_hop_facts.json`` → single-hop and composed items.

The table is package data (this module's folder), so an installed wheel has it; ``data/two_hop_facts.json`` is the
published copy beside the task documentation, kept identical by a test."""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from depthcache.errors import DepthcacheError
from depthcache.tasks.base import (
    N_DISTRACTORS,
    TaskItem,
    item_rng,
    subset_indices,
    with_distractors,
)
from depthcache.textio import read_text

TABLE = Path(__file__).resolve().with_name("two_hop_facts.json")
DESCRIPTION = ("hand-written fact chains (landmark -> city -> country, person -> birth city -> country -> capital, "
               "...): every single hop (hops=1) and every composed 2- or 3-hop prompt; n counts chains")
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Hop:
    """One fact: a prompt about a subject whose answer (leading space) is the related object."""

    relation: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Chain:
    """Facts composed in order (hop i's answer is hop i+1's subject) and the prompt that asks for the composition."""

    id: str
    hops: tuple[Hop, ...]
    prompt: str
    answer: str


def slug(text: str) -> str:
    """Lower-case ASCII words joined by '-': a readable, stable id fragment."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def hop_id(hop: Hop) -> str:
    """The item id of a single hop, shared by every chain that uses the same fact."""
    return "fact-" + slug(hop.prompt)


def text_field(obj: object, key: str, where: str) -> str:
    """``obj[key]`` when ``obj`` is an object holding a non-empty string there."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str) or not value:
        raise DepthcacheError(f"{where}: needs a non-empty string '{key}'")
    return value


def parse_chain(obj: object, where: str) -> Chain:
    """One chain object of the table file."""
    hops = obj.get("hops") if isinstance(obj, dict) else None
    composed = obj.get("composed") if isinstance(obj, dict) else None
    if not isinstance(hops, list) or len(hops) < 2 or not isinstance(composed, dict):
        raise DepthcacheError(f"{where}: needs 'id', 'composed' {{prompt, answer}} and a list of >= 2 'hops'")
    parsed = tuple(Hop(*(text_field(h, key, f"{where} hop {j + 1}") for key in ("relation", "prompt", "answer")))
                   for j, h in enumerate(hops))
    return Chain(text_field(obj, "id", where), parsed, text_field(composed, "prompt", where),
                 text_field(composed, "answer", where))


def chain_problems(chain: Chain, relations: dict[str, str]) -> list[str]:
    """What is inconsistent inside one chain (empty when it is sound)."""
    problems = []
    for hop in chain.hops:
        if hop.relation not in relations:
            problems.append(f"relation {hop.relation!r} is not listed under 'relations'")
        if not hop.answer.startswith(" ") or hop.answer[1:2].isspace() or hop.prompt[-1].isspace():
            problems.append(f"{hop.prompt!r} -> {hop.answer!r} breaks the answer-space convention")
    for first, second in itertools.pairwise(chain.hops):
        if first.answer.strip() not in second.prompt:
            problems.append(f"{first.answer.strip()!r} (answer of {first.prompt!r}) is missing from {second.prompt!r}")
    if chain.answer != chain.hops[-1].answer:
        problems.append(f"composed answer {chain.answer!r} differs from the last hop's {chain.hops[-1].answer!r}")
    return [f"chain {chain.id!r}: {p}" for p in problems]


def table_problems(chains: list[Chain], relations: dict[str, str]) -> list[str]:
    """Every inconsistency in the table: per chain, across chains, and too-small distractor pools."""
    problems = [p for chain in chains for p in chain_problems(chain, relations)]
    ids = [chain.id for chain in chains]
    problems += [f"chain id {i!r} is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    answers: dict[str, str] = {}
    prompts: dict[str, str] = {}
    for hop in (hop for chain in chains for hop in chain.hops):
        if answers.setdefault(hop.prompt, hop.answer) != hop.answer:
            problems.append(f"{hop.prompt!r} has two answers: {answers[hop.prompt]!r} and {hop.answer!r}")
        if prompts.setdefault(hop_id(hop), hop.prompt) != hop.prompt:
            problems.append(f"{prompts[hop_id(hop)]!r} and {hop.prompt!r} share the id {hop_id(hop)!r}")
    problems += [f"relation {r!r} has only {len(pool)} distinct answers; distractors need {N_DISTRACTORS + 1}"
                 for r, pool in relation_pools(chains).items() if len(pool) < N_DISTRACTORS + 1]
    return problems


def relation_pools(chains: list[Chain]) -> dict[str, list[str]]:
    """Distinct answers of each relation across the table: the distractors for items of that relation."""
    pools: dict[str, dict[str, None]] = {}
    for hop in (hop for chain in chains for hop in chain.hops):
        pools.setdefault(hop.relation, {})[hop.answer] = None
    return {relation: list(answers) for relation, answers in pools.items()}


def load_table(path: Path = TABLE) -> list[Chain]:
    """The chains of a fact table file, checked for consistency."""
    if not path.is_file():
        raise DepthcacheError(f"fact table {path} not found" + (": this depthcache installation is incomplete; "
                              "reinstall it" if path == TABLE else ""))
    try:
        doc = json.loads(read_text(path))
    except RecursionError as exc:
        raise DepthcacheError(f"{path}: JSON nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise DepthcacheError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not (isinstance(doc, dict) and isinstance(doc.get("relations"), dict) and isinstance(doc.get("chains"), list)):
        raise DepthcacheError(f"{path}: expected an object with 'relations' (name -> description) and 'chains' (list)")
    chains = [parse_chain(obj, f"{path}: chain #{i + 1}") for i, obj in enumerate(doc["chains"])]
    problems = table_problems(chains, doc["relations"])
    if problems:
        raise DepthcacheError(f"{path} is inconsistent; fix these entries:\n  " + "\n  ".join(problems))
    return chains


def chain_items(chain: Chain, pools: dict[str, list[str]], seed: int) -> list[TaskItem]:
    """The single-hop items of a chain, then its composed item linking to them through ``meta['hop_ids']``."""
    singles = [TaskItem(id=hop_id(hop), prompt=hop.prompt, answer=hop.answer, hops=1, meta={"relation": hop.relation},
                        choices=with_distractors(hop.answer, pools[hop.relation], item_rng(seed, hop_id(hop))))
               for hop in chain.hops]
    last = chain.hops[-1].relation
    composed = TaskItem(id=f"chain-{chain.id}", prompt=chain.prompt, answer=chain.answer, hops=len(chain.hops),
                        choices=with_distractors(chain.answer, pools[last], item_rng(seed, f"chain-{chain.id}")),
                        meta={"chain": chain.id, "relation": last, "hop_ids": [item.id for item in singles]})
    return [*singles, composed]


def generate(n: int | None, seed: int) -> list[TaskItem]:
    """Items of ``n`` seeded chains (all when None), each single hop once, in table order."""
    chains = load_table()
    pools = relation_pools(chains)
    items: dict[str, TaskItem] = {}
    for index in subset_indices(len(chains), n, seed, "fact chains"):
        for item in chain_items(chains[index], pools, seed):
            items.setdefault(item.id, item)
    return list(items.values())
