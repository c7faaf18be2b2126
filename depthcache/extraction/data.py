"""Text datasets (built-in, files, folders, JSONL, Hugging Face datasets, Python objects, tasks) → documents.

Records (JSONL lines, rows of a Hugging Face dataset, dicts handed in from Python) become documents through
``DataFields``: their ``text_field``, or with ``prompt_field`` set, task items (prompt, answer) whose answer may be
cut out of a longer field (``answer_after="####"`` for GSM8K's worked solutions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from depthcache.errors import DepthcacheError
from depthcache.extraction.task_data import TaskDocuments, load_task_documents, parse_task_spec
from depthcache.extraction.windows import Documents
from depthcache.tasks import TaskItem
from depthcache.tasks.base import subset_indices
from depthcache.textio import read_text

DEFAULT_DATASET = "pydoc-topics"
BUILTIN_DATASETS = {"pydoc-topics": "Python's own documentation topics (pydoc_data.topics): ~465k characters "
                                    "of real English prose that ships with Python"}
DATASETS_FILES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}  # read through Hugging Face datasets
DATASETS_PIP = "pip install 'depthcache[datasets]'"
SHOWN_FIELDS = 8


@dataclass(frozen=True)
class DataFields:
    """Which fields of a record are the text (or, with ``prompt_field``, a task's prompt and answer)."""

    text_field: str = "text"
    prompt_field: str | None = None  # a field name, or a template such as "Question: {question}\nAnswer:"
    answer_field: str = "answer"
    answer_after: str | None = None  # the answer is the text after the last occurrence of this marker
    answer_regex: str | None = None  # the answer is the first match (its group 1 if it has one)
    split: str | None = None  # the split of a saved DatasetDict (default: train, or its only split)

    @property
    def task(self) -> bool:
        """True when records are task items (prompt and answer) rather than plain documents."""
        return self.prompt_field is not None

    def record(self) -> dict[str, Any]:
        """The fields that shaped the documents, for the store's provenance (defaults left out)."""
        keys = ("prompt_field", "answer_field", "answer_after", "answer_regex") if self.task else ("text_field",)
        return {key: value for key, value in asdict(self).items() if key in keys + ("split",) and value is not None}


def check_fields(fields: DataFields) -> None:
    """Refuse contradictory or malformed field options before anything is read."""
    if fields.answer_after is not None and fields.answer_regex is not None:
        raise DepthcacheError("give --answer-after or --answer-regex, not both")
    if not fields.task and (fields.answer_after is not None or fields.answer_regex is not None):
        raise DepthcacheError("--answer-after/--answer-regex apply to task data: also give --prompt-field")
    if fields.answer_regex is not None:
        try:
            re.compile(fields.answer_regex)
        except re.error as exc:
            raise DepthcacheError(f"--answer-regex {fields.answer_regex!r} is not a regular expression ({exc})") from exc


def load_documents(spec: str, fields: DataFields = DataFields()) -> Documents:
    """A built-in dataset name, a .txt file, a folder of .txt files, a JSONL file, a Hugging Face dataset saved with
    ``save_to_disk`` or a .parquet/.arrow/.csv file (records through ``fields``), or a task
    (``task:NAME[?n=60&seed=0&option=value]``: one document per item, prompt + answer)."""
    check_fields(fields)
    if spec.startswith("task:") and not fields.task:
        return load_task_documents(spec)
    if spec == "pydoc-topics":
        from pydoc_data.topics import topics

        return Documents(spec, tuple(topics[key] for key in sorted(topics)))
    path_text, params = parse_task_spec(spec) if spec.startswith("task:") else (spec, {})
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DepthcacheError(f"no dataset {spec!r}: give a .txt file, a folder of .txt files, a .jsonl file, a "
                              f"Hugging Face dataset folder (save_to_disk) or .parquet/.arrow/.csv file, a task "
                              f"(task:two-hop-facts, task:FILE.jsonl), or one of: {', '.join(BUILTIN_DATASETS)}")
    if path.is_dir() and not is_saved_dataset(path):
        if fields.task:
            raise DepthcacheError(f"{spec} is a folder of .txt files: task fields (--prompt-field) need records "
                                  "(a .jsonl file or a Hugging Face dataset)")
        docs = tuple(read_text(f) for f in sorted(path.glob("*.txt")))
        return checked(Documents(str(path), tuple(d for d in docs if d.strip())), spec)
    if path.is_dir() or path.suffix in DATASETS_FILES:
        return records_documents(str(path), *hf_records(path, fields.split), fields, params)
    if path.suffix == ".jsonl":
        return records_documents(str(path), jsonl_records(path), None, fields, params)
    if fields.task:
        raise DepthcacheError(f"{spec} is a plain text file: task fields (--prompt-field) need records")
    return checked(Documents(str(path), tuple(d for d in (read_text(path),) if d.strip())), spec)


def checked(docs: Documents, spec: str) -> Documents:
    """``docs`` when it holds any text, else a clear refusal."""
    if not docs.texts:
        raise DepthcacheError(f"dataset {spec!r} holds no text")
    return docs


def is_saved_dataset(folder: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def import_datasets() -> Any:
    """The Hugging Face ``datasets`` library (an optional dependency), or a clear line on how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise DepthcacheError(f"reading Hugging Face datasets, parquet, arrow or CSV needs the datasets library: "
                              f"{DATASETS_PIP}") from exc
    return datasets


def hf_records(path: Path, split: str | None) -> tuple[Any, str | None]:
    """A saved dataset folder (one split of a DatasetDict) or a parquet/arrow/CSV file as a ``datasets.Dataset``,
    with its fingerprint."""
    datasets = import_datasets()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(DATASETS_FILES[path.suffix], data_files=str(path), split="train")
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DepthcacheError(f"cannot read {path} as a Hugging Face dataset ({type(exc).__name__}: {exc})") from exc
    dataset = pick_split(loaded, split, str(path))
    return dataset, getattr(dataset, "_fingerprint", None)


def pick_split(loaded: Any, split: str | None, name: str) -> Any:
    """The requested split of a DatasetDict (default: 'train', or its only split); a Dataset as it is."""
    if not hasattr(loaded, "keys"):
        if split is not None:
            raise DepthcacheError(f"{name} is a single dataset without splits: drop --split")
        return loaded
    splits = list(loaded.keys())
    chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        raise DepthcacheError(f"{name} has splits {', '.join(splits)}: choose one with --split (split= in Python)")
    return loaded[chosen]


def jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file, with the line number of any bad line."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DepthcacheError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise DepthcacheError(f"{path}:{number}: JSON nested too deeply") from exc
        if not isinstance(record, dict):
            raise DepthcacheError(f"{path}:{number}: each line must be a JSON object")
        yield record


def records_documents(name: str, records: Iterable[Any], fingerprint: str | None, fields: DataFields,
                      params: Mapping[str, object] | None = None) -> Documents:
    """Documents (or task documents) from records through ``fields``; ``params`` may ask for a seeded subset of
    task items (n, seed)."""
    check_fields(fields)
    records = list(records)
    details = {"fingerprint": fingerprint, "fields": fields.record()}
    if fields.task:
        return task_documents(name, records, fields, dict(params or {}), details)
    if params:
        raise DepthcacheError(f"options {', '.join(params)} apply to task data only: also give --prompt-field")
    texts = tuple(text for text in (field_text(r, fields.text_field, i, name) for i, r in enumerate(records))
                  if text.strip())
    return checked(Documents(name, texts, details), name)


def field_text(record: Any, field: str, index: int, name: str) -> str:
    """One string field of record ``index``, or a refusal that lists the fields the records do have."""
    if isinstance(record, str) and field == "text":
        return record
    if not isinstance(record, Mapping):
        raise DepthcacheError(f"{name}: record {index} is a {type(record).__name__}, expected a mapping with a "
                              f"{field!r} field")
    if field not in record:
        shown = ", ".join(map(repr, list(record)[:SHOWN_FIELDS]))
        raise DepthcacheError(f"{name}: record {index} has no field {field!r}; its fields: {shown} (choose one with "
                              "--text-field, or --prompt-field/--answer-field for a task)")
    value = record[field]
    if not isinstance(value, str):
        raise DepthcacheError(f"{name}: record {index} field {field!r} is a {type(value).__name__}, not text")
    return value


def prompt_text(record: Mapping[str, Any], template: str, index: int, name: str) -> str:
    """The prompt of a record: a field's text, or a template filled with the record's fields ('{question}')."""
    if "{" not in template:
        return field_text(record, template, index, name)
    try:
        return template.format(**record)
    except (KeyError, IndexError, ValueError) as exc:
        raise DepthcacheError(f"{name}: record {index} cannot fill the prompt template {template!r} "
                              f"({type(exc).__name__}: {exc}); its fields: {', '.join(map(str, record))}") from exc


def extract_answer(text: str, fields: DataFields, index: int, name: str) -> str:
    """The answer inside an answer field: after the last ``answer_after`` marker, or the regex's match."""
    if fields.answer_after is not None:
        if fields.answer_after not in text:
            raise DepthcacheError(f"{name}: record {index} answer has no {fields.answer_after!r} "
                                  f"(--answer-after): {text[-60:]!r}")
        text = text.rsplit(fields.answer_after, 1)[1]
    elif fields.answer_regex is not None:
        match = re.search(fields.answer_regex, text)
        if match is None:
            raise DepthcacheError(f"{name}: record {index} answer does not match --answer-regex "
                                  f"{fields.answer_regex!r}: {text[-60:]!r}")
        text = match.group(1) if match.re.groups else match.group(0)
    return text.strip()


def record_item(record: Any, fields: DataFields, index: int, name: str) -> TaskItem:
    """A task item from one record: the prompt without trailing whitespace, the answer with one leading space
    (the task convention: ``prompt + answer`` is the text a model reads)."""
    if not isinstance(record, Mapping):
        raise DepthcacheError(f"{name}: record {index} is a {type(record).__name__}, expected a mapping")
    prompt = prompt_text(record, fields.prompt_field or "", index, name).rstrip()
    answer = extract_answer(str(field_text(record, fields.answer_field, index, name)), fields, index, name)
    if not prompt or not answer:
        raise DepthcacheError(f"{name}: record {index} has an empty {'prompt' if not prompt else 'answer'}")
    item_id = record.get("id")
    return TaskItem(id=str(item_id) if isinstance(item_id, (str, int)) else str(index), prompt=prompt,
                    answer=" " + answer, hops=1)


def task_documents(name: str, records: list[Any], fields: DataFields, params: dict[str, object],
                   details: dict[str, Any]) -> TaskDocuments:
    """Task documents from records (a seeded subset with ``n``/``seed``), one window per item."""
    n, seed = params.pop("n", None), params.pop("seed", 0)
    if params:
        raise DepthcacheError(f"task data from records take only n and seed, got {', '.join(sorted(params))}")
    picked = subset_indices(len(records), n, seed, f"records in {name}")  # type: ignore[arg-type]
    items = tuple(record_item(records[i], fields, i, name) for i in picked)
    if not items:
        raise DepthcacheError(f"dataset {name!r} holds no records")
    task = {"name": name, "n": n, "seed": seed, "options": fields.record()}
    return TaskDocuments(name, tuple(i.prompt + i.answer for i in items), details, items=items, task=task)


def python_documents(data: Any, fields: DataFields) -> Documents:
    """Documents from what a Python caller hands over: a ``datasets.Dataset`` (or one split of a DatasetDict),
    an iterable of strings, of dicts, or of ``TaskItem``."""
    check_fields(fields)
    module = type(data).__module__
    if module.startswith("datasets"):
        dataset = pick_split(data, fields.split, "the dataset")
        name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "datasets.Dataset"
        return records_documents(f"datasets:{name}", dataset, getattr(dataset, "_fingerprint", None), fields)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DepthcacheError(f"expected texts (an iterable of strings), a datasets.Dataset or a --data spec, got "
                              f"{type(data).__name__}")
    records = list(data)
    if records and all(isinstance(r, TaskItem) for r in records):
        task = {"name": "python", "n": None, "seed": 0, "options": {}}
        return TaskDocuments("python", tuple(i.prompt + i.answer for i in records), {"fingerprint": None},
                             items=tuple(records), task=task)
    return records_documents("python", records, None, fields)
