"""Data in: Hugging Face datasets (saved folders, parquet, arrow, CSV), JSONL with custom field names, and task
items read from records (prompt template, answer cut after a marker), through --data and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers
from click.testing import CliRunner
from conftest import save_tiny_model

import depthcache
from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction.data import DataFields, load_documents, python_documents

BODIES = ["The quick brown fox jumps over the lazy dog.", "Residual streams carry information from layer to layer.",
          "Numbers: 0 1 2 3 4 5 6 7 8 9 + - = ( ) and some punctuation, too!"]
GSM8K = {"question": ["Tom has 3 apples and buys 4 more. How many apples does he have?",
                      "A box holds 6 eggs. How many eggs are in 2 boxes?",
                      "Sam reads 5 pages a day. How many pages in 3 days?"],
         "answer": ["He has 3 + 4 = 7 apples.\n#### 7", "2 * 6 = 12 eggs.\n#### 12", "5 * 3 = 15\n#### 15"]}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("data-model") / "llama")


def test_files_with_custom_field_names_give_the_same_documents(tmp_path: Path) -> None:
    table = datasets.Dataset.from_dict({"id": [0, 1, 2], "body": BODIES})
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": b}) + "\n" for b in BODIES))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    fields = DataFields(text_field="body")
    for spec in ("d.parquet", "d.csv", "d.jsonl", "saved", str(arrow.relative_to(tmp_path)), "dict"):
        docs = load_documents(str(tmp_path / spec), fields)
        assert docs.texts == tuple(BODIES), spec
    assert load_documents(str(tmp_path / "saved"), fields).details["fingerprint"] == \
        datasets.load_from_disk(str(tmp_path / "saved"))._fingerprint
    assert load_documents(str(tmp_path / "dict"), DataFields("body", split="test")).texts == (BODIES[0],)
    assert python_documents(table, fields).texts == tuple(BODIES)
    assert python_documents(iter(BODIES), DataFields()).texts == tuple(BODIES)


def test_unknown_field_and_split_are_refused_with_what_exists(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"body": BODIES}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DepthcacheError, match="no field 'text'; its fields: 'body'"):
        load_documents(str(tmp_path / "saved"))
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"body": BODIES}),
                          "b": datasets.Dataset.from_dict({"body": BODIES})}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DepthcacheError, match="splits a, b"):
        load_documents(str(tmp_path / "dict"), DataFields("body"))
    with pytest.raises(DepthcacheError, match="not both"):
        load_documents(str(tmp_path / "saved"), DataFields(prompt_field="q", answer_after="#", answer_regex="x"))
    gsm = datasets.Dataset.from_dict({"question": ["2+2?"], "answer": ["4"]})
    with pytest.raises(DepthcacheError, match="has no '####'"):
        python_documents(gsm, DataFields(prompt_field="question", answer_after="####"))


def test_task_records_cut_the_answer_and_fill_the_prompt_template() -> None:
    gsm = datasets.Dataset.from_dict(GSM8K)
    docs = python_documents(gsm, DataFields(prompt_field="Question: {question}\nAnswer:", answer_after="####"))
    assert [it.answer for it in docs.items] == [" 7", " 12", " 15"]
    assert docs.items[0].prompt == "Question: " + GSM8K["question"][0] + "\nAnswer:"
    regex = python_documents(gsm, DataFields(prompt_field="question", answer_regex=r"= (\d+)"))
    assert [it.answer for it in regex.items] == [" 7", " 12", " 15"] and regex.items[1].prompt == GSM8K["question"][1]
    assert docs.task["options"] == {"prompt_field": "Question: {question}\nAnswer:", "answer_field": "answer",
                                    "answer_after": "####"}


def test_custom_fields_extract_from_the_command_line(llama: Path, tmp_path: Path) -> None:
    saved = tmp_path / "gsm8k"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(GSM8K)}).save_to_disk(str(saved))
    out = tmp_path / "gsm.zarr"
    result = CliRunner().invoke(main, ["extract", "--model", str(llama), "--data", f"task:{saved}?n=2", "--split",
                                       "test", "--prompt-field", "Question: {question}\nAnswer:", "--answer-after",
                                       "####", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    ds = depthcache.open(out, token_text=True)
    attrs = ds.attrs["depthcache"]["dataset"]
    assert attrs["fingerprint"] == datasets.load_from_disk(str(saved))["test"]._fingerprint
    assert attrs["fields"]["split"] == "test" and attrs["task"]["n"] == 2 and len(attrs["items"]) == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    for index, item in enumerate(attrs["items"]):
        answer_next = ds.next_token_id.values[(ds.item.values == index) & (ds.answer_index.values >= 0)]
        assert tokenizer.decode(answer_next) == item["answer"]
    plain = CliRunner().invoke(main, ["extract", "--model", str(llama), "--data", str(saved), "--split", "test",
                                      "--text-field", "question", "--out", str(tmp_path / "q.zarr"), "--device",
                                      "cpu", "--no-progress", "--seq-len", "16"])
    assert plain.exit_code == 0, plain.output
    q = depthcache.open(tmp_path / "q.zarr")
    assert q.attrs["depthcache"]["dataset"]["n_documents"] == 3
    assert np.unique(q.doc_id.values).tolist() == [0, 1, 2]
    refused = CliRunner().invoke(main, ["extract", "--model", str(llama), "--data", str(saved), "--out",
                                        str(tmp_path / "r.zarr")])
    assert refused.exit_code == 2 and "no field 'text'" in refused.output and not (tmp_path / "r.zarr").exists()
