"""Task datasets: determinism, correct answers, choice sets, the fact table's consistency and the JSONL format."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from depthcache.errors import DepthcacheError
from depthcache.tasks import TASKS, TaskItem, load_task, write_task_jsonl
from depthcache.tasks.addition import near_misses
from depthcache.tasks.two_hop_facts import (
    TABLE,
    Chain,
    Hop,
    load_table,
    table_problems,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
RELATIONS = {"landmark_city": "", "city_country": ""}


def exported(items: list[TaskItem], path: Path) -> bytes:
    """The bytes of ``items`` written as a task file."""
    return write_task_jsonl(items, path).read_bytes()


@pytest.fixture(scope="module")
def builtin() -> dict[str, list[TaskItem]]:
    return {name: load_task(name) for name in TASKS}


def test_builtin_names_and_default_sizes(builtin):
    assert set(TASKS) == {"addition", "arithmetic-chain", "two-hop-facts", "prose-continuation", "retrieval"}
    assert all(isinstance(text, str) and text and "\n" not in text for text in TASKS.values())
    assert len(builtin["addition"]) == 200
    assert [sum(i.hops == k for i in builtin["arithmetic-chain"]) for k in (1, 2, 3, 4)] == [50, 50, 50, 50]
    assert len(builtin["prose-continuation"]) == 200
    assert [sum(i.meta["pairs"] == p for i in builtin["retrieval"]) for p in (4, 8, 16, 32)] == [50, 50, 50, 50]
    facts = builtin["two-hop-facts"]
    assert sum(i.hops == 2 for i in facts) >= 40 and sum(i.hops == 3 for i in facts) >= 10


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_bytes_other_seed_different(name, tmp_path):
    first = exported(load_task(name, n=30, seed=7), tmp_path / "a.jsonl")
    assert exported(load_task(name, n=30, seed=7), tmp_path / "b.jsonl") == first
    assert exported(load_task(name, n=30, seed=8), tmp_path / "c.jsonl") != first


@pytest.mark.parametrize("name", sorted(TASKS))
def test_ids_unique_choices_hold_answer_once_and_answer_space(name, builtin):
    items = builtin[name]
    assert len({i.id for i in items}) == len(items)
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.choices.count(item.answer) == 1
        assert item.answer.startswith(" ") and not item.answer[1].isspace()
        assert all(c.startswith(" ") and not c[1].isspace() for c in item.choices)
        assert not item.prompt[-1].isspace()
    assert len({i.choices.index(i.answer) for i in items}) > 1, "gold must not always sit in the same slot"


def solved_lines(text: str) -> list[tuple[list[int], int]]:
    """(operands, written result) of each solved line of a few-shot prefix, parsed without eval."""
    parsed = []
    for line in text.splitlines():
        match = re.fullmatch(r"(?:What is )?([\d+]+)(?:\? Answer:| =) (\d+)", line)
        assert match, line
        parsed.append(([int(x) for x in match.group(1).split("+")], int(match.group(2))))
    return parsed


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_addition_answers_are_correct_sums(digits):
    items = load_task("addition", n=50, digits=digits)
    prefix = items[0].prompt[: -len(items[0].meta["question"])]
    shots = solved_lines(prefix)
    assert len(shots) == 3 and all(sum(ops) == result for ops, result in shots)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    for item in items:
        a, b = (int(x) for x in re.fullmatch(r"What is (\d+)\+(\d+)\? Answer:", item.meta["question"]).groups())
        assert item.prompt == prefix + item.meta["question"]
        assert [a, b] == item.meta["operands"] and item.hops == 1
        assert low <= a < 10 ** digits and low <= b < 10 ** digits
        assert int(item.answer) == a + b
        assert ([a, b], a + b) not in shots
    assert len({tuple(i.meta["operands"]) for i in items}) == len(items)


def test_arithmetic_chain_answers_and_hops_match_the_expression():
    items = load_task("arithmetic-chain", n=40, max_ops=4)
    prefix = items[0].prompt[: -len(items[0].meta["question"])]
    assert all(sum(ops) == result for ops, result in solved_lines(prefix))
    for item in items:
        expression = item.prompt[len(prefix):]
        assert item.prompt.startswith(prefix) and expression == item.meta["question"]
        operands = [int(x) for x in re.fullmatch(r"([1-9](?:\+[1-9])*) =", expression).group(1).split("+")]
        assert item.hops == expression.count("+") == len(operands) - 1
        assert int(item.answer) == sum(operands)
    assert [sum(i.hops == k for i in items) for k in (1, 2, 3, 4)] == [10, 10, 10, 10]


def test_retrieval_answer_is_in_the_prompt_among_distractors_and_lists_grow():
    items = load_task("retrieval", n=40, seed=5)
    assert [i.meta["pairs"] for i in items] == [4] * 10 + [8] * 10 + [16] * 10 + [32] * 10
    for item in items:
        header, *listing, recall, query = item.prompt.split("\n")
        pairs = [re.fullmatch(r"([a-z]+): (\d{3})", line).groups() for line in listing]
        keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        assert header == "Remember the number after each word." and recall == "Now recall."
        assert len(pairs) == item.meta["pairs"] and len(set(keys)) == len(keys) and len(set(values)) == len(values)
        assert query == f"{item.meta['key']}:" == f"{keys[item.meta['position']]}:"
        assert item.answer == " " + values[item.meta["position"]]  # the answer is the asked word's number
        assert {c.strip() for c in item.choices} <= set(values)  # distractors: other numbers of the same list
    assert len({i.meta["position"] for i in items if i.meta["pairs"] == 32}) > 5  # the asked pair moves around
    assert load_task("retrieval", n=3, seed=5)[0] == items[0]  # an item does not depend on n
    fixed = load_task("retrieval", n=6, min_pairs=6, max_pairs=6)
    assert all(i.meta["pairs"] == 6 and i.prompt.count("\n") == 8 for i in fixed)
    assert [i.meta["pairs"] for i in load_task("retrieval", n=3, min_pairs=5, max_pairs=12)] == [5, 10, 12]
    with pytest.raises(DepthcacheError, match="min_pairs must be an integer between 4"):
        load_task("retrieval", min_pairs=3)
    with pytest.raises(DepthcacheError, match="max_pairs=8 is below min_pairs=16"):
        load_task("retrieval", min_pairs=16, max_pairs=8)


def test_near_misses_are_close_distinct_and_never_the_answer():
    for value in (0, 7, 10, 99, 106, 1998):
        misses = near_misses(value)
        assert value not in misses and len(misses) >= 3 and min(misses) >= 0
        assert all(abs(len(str(m)) - len(str(value))) <= 1 for m in misses)
    assert {105, 107, 96, 116, 160} <= set(near_misses(106))


def test_fact_table_is_consistent():
    chains = load_table()
    assert sum(len(c.hops) == 2 for c in chains) >= 40 and sum(len(c.hops) == 3 for c in chains) >= 10
    for chain in chains:
        assert chain.answer == chain.hops[-1].answer
        for first, second in itertools.pairwise(chain.hops):
            assert first.answer.strip() in second.prompt
    answers: dict[str, str] = {}
    for hop in (h for c in chains for h in c.hops):
        assert answers.setdefault(hop.prompt, hop.answer) == hop.answer


def test_fact_items_link_composed_prompts_to_their_single_hops(builtin):
    items = {i.id: i for i in builtin["two-hop-facts"]}
    composed = [i for i in items.values() if i.hops > 1]
    assert composed
    for item in composed:
        hops = [items[hop_id] for hop_id in item.meta["hop_ids"]]
        assert len(hops) == item.hops and all(h.hops == 1 for h in hops)
        assert item.answer == hops[-1].answer and item.meta["relation"] == hops[-1].meta["relation"]
        assert all(a.answer.strip() in b.prompt for a, b in itertools.pairwise(hops))
    assert {"The Eiffel Tower is in the city of", "Paris is a city in the country of",
            "The Eiffel Tower is in the country of"} <= {i.prompt for i in items.values()}


def test_fact_distractors_share_the_relation(builtin):
    items = builtin["two-hop-facts"]
    answers_of: dict[str, set[str]] = {}
    for item in items:
        answers_of.setdefault(item.meta["relation"], set()).add(item.answer)
    for item in items:
        assert set(item.choices) <= answers_of[item.meta["relation"]]


def test_fact_n_counts_chains_and_keeps_hops_with_their_chain():
    items = load_task("two-hop-facts", n=12, seed=3)
    ids = {i.id for i in items}
    composed = [i for i in items if i.hops > 1]
    assert len(composed) == 12
    assert all(set(i.meta["hop_ids"]) <= ids for i in composed)
    assert {i.id for i in load_task("two-hop-facts", n=5, seed=3)} <= ids


def test_fact_seed_changes_choices_not_facts(builtin):
    other = load_task("two-hop-facts", seed=1)
    base = builtin["two-hop-facts"]
    assert [(i.id, i.prompt, i.answer) for i in other] == [(i.id, i.prompt, i.answer) for i in base]
    assert sum(a.choices != b.choices for a, b in zip(base, other, strict=True)) > len(base) // 2


def test_fact_table_problems_are_reported():
    good = Chain("x", (Hop("landmark_city", "The Louvre is in the city of", " Paris"),
                       Hop("city_country", "Paris is a city in the country of", " France")),
                 "The Louvre is in the country of", " France")
    assert not [p for p in table_problems([good], RELATIONS) if "distinct answers" not in p]
    broken = Chain("y", (Hop("landmark_city", "The Louvre is in the city of", " Rome"),
                         Hop("city_country", "Paris is a city in the country of", "France")),
                   "The Louvre is in the country of", " Italy")
    problems = "\n".join(table_problems([good, broken], RELATIONS))
    assert "'Rome' (answer of" in problems
    assert "differs from the last hop" in problems
    assert "answer-space convention" in problems
    assert "has two answers" in problems
    assert "used twice" in "\n".join(table_problems([good, good], RELATIONS))


def test_broken_fact_table_file_raises(tmp_path):
    doc = json.loads(TABLE.read_text(encoding="utf-8"))
    doc["chains"][0]["composed"]["answer"] = " Nowhere"
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DepthcacheError, match=r"eiffel-tower.*differs from the last hop"):
        load_table(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DepthcacheError, match="not valid JSON"):
        load_table(path)


def test_prose_answers_continue_the_real_text(builtin):
    for item in builtin["prose-continuation"]:
        source = " ".join(topics[item.meta["topic"]].split())
        assert " ".join((item.prompt + item.answer).split()) in source
        assert len(item.answer.split()) == 3 and len(item.prompt.split()) >= 5
    words = load_task("prose-continuation", n=5, words=2)
    assert all(len(c.split()) == 2 for i in words for c in i.choices)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_jsonl_round_trip(name, tmp_path):
    items = load_task(name, n=15)
    path = write_task_jsonl(items, tmp_path / "sub" / f"{name}.jsonl")
    assert load_task(path) == items
    assert load_task(str(path), n=4) == [i for i in items if i in load_task(path, n=4)]
    assert len(load_task(path, n=4)) == 4


def test_minimal_task_file_gets_defaults(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "The capital of France is", "answer": " Paris"}\n\n'
                    '{"id": "q2", "prompt": "2+2 =", "answer": " 4", "choices": [" 3", " 4"], "hops": 2}\n',
                    encoding="utf-8")
    first, second = load_task(path)
    assert first == TaskItem(id="mine-1", prompt="The capital of France is", answer=" Paris")
    assert second.choices == (" 3", " 4") and second.hops == 2 and second.id == "q2"


@pytest.mark.parametrize(("lines", "problem"), [
    (['{"prompt": "a", "answer": " b"}', '{"prompt": "c", "answer": " d"}', '{"prompt": "e", "answer"'],
     r"line 3: not valid JSON"),
    (['{"prompt": "a"}'], r"line 1: missing required key\(s\) 'answer'"),
    (['{"prompt": "a", "answer": " b", "choice": [" b"]}'], r"line 1: unknown key\(s\) 'choice'"),
    (['{"prompt": "a", "answer": " b", "choices": [" c", " d"]}'], r"line 1: .*must include the answer"),
    (['{"prompt": "a", "answer": " b", "choices": [" b", " b"]}'], r"line 1: .*must be distinct"),
    (['{"prompt": "a", "answer": " b", "choices": " b"}'], r"line 1: 'choices' must be a list"),
    (['{"prompt": "a", "answer": " b", "hops": 0}'], r"line 1: .*'hops' must be an integer >= 1"),
    (['{"prompt": "", "answer": " b"}'], r"line 1: .*'prompt' must be a non-empty string"),
    (['["a", " b"]'], r"line 1: expected a JSON object"),
    (['{"id": "x", "prompt": "a", "answer": " b"}', '', '{"id": "x", "prompt": "c", "answer": " d"}'],
     r"line 3: id 'x' is already used on line 1"),
])
def test_task_file_errors_name_file_line_and_problem(lines, problem, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DepthcacheError, match=re.escape(str(path)) + ", " + problem):
        load_task(path)


def test_empty_or_missing_task_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DepthcacheError, match="holds no items"):
        load_task(empty)
    with pytest.raises(DepthcacheError, match="not found"):
        load_task(tmp_path / "missing.jsonl")


def test_unknown_task_lists_builtin_names():
    with pytest.raises(DepthcacheError) as info:
        load_task("gsm8k")
    assert "'gsm8k'" in str(info.value) and all(name in str(info.value) for name in TASKS)


@pytest.mark.parametrize(("call", "problem"), [
    (lambda: load_task("addition", n=0), "n must be an integer >= 1"),
    (lambda: load_task("addition", seed=-1), "seed must be an integer >= 0"),
    (lambda: load_task("addition", digits=0), "digits must be an integer between 1 and 30"),
    (lambda: load_task("addition", n=98, digits=1), "n=98 is more than the 97"),
    (lambda: load_task("addition", ops=3), r"no option 'ops'; its options: digits \(default 2\)"),
    (lambda: load_task("two-hop-facts", n=10_000), "n=10000 is more than the 198 fact chains"),
    (lambda: load_task("arithmetic-chain", n=400), "only 78 exist"),
])
def test_bad_arguments_raise_with_a_fix(call, problem):
    with pytest.raises(DepthcacheError, match=problem):
        call()


def test_task_item_validates_and_normalises_choices():
    item = TaskItem(id="a", prompt="p", answer=" x", choices=[" x", " y"])
    assert item.choices == (" x", " y") and hash(item) == hash(TaskItem("a", "p", " x", (" x", " y"), meta={"k": 1}))
    with pytest.raises(DepthcacheError, match="must include the answer"):
        TaskItem(id="a", prompt="p", answer=" x", choices=(" y", " z"))
    with pytest.raises(DepthcacheError, match="'hops' must be an integer"):
        TaskItem(id="a", prompt="p", answer=" x", hops=True)


def test_small_n_is_a_prefix_of_larger_for_addition():
    assert load_task("addition", n=10) == load_task("addition", n=40)[:10]


def test_package_fact_table_is_the_published_one():
    assert TABLE.read_bytes() == (DATA_DIR / "two_hop_facts.json").read_bytes()


def test_data_readme_documents_every_task():
    readme = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    assert all(f"### `{name}`" in readme for name in TASKS)
