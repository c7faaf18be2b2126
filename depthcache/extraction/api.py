"""``depthcache.extract``: a model (loaded in Python, or named) and texts or a dataset in, an opened store out.

The same pipeline as ``depthcache extract`` (resumable, chunked, checksummed); what differs is only how the model
and the documents arrive: as Python objects instead of a --model spec and a --data spec.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xarray as xr

from depthcache.errors import DepthcacheError
from depthcache.extraction.data import BUILTIN_DATASETS, DataFields, python_documents
from depthcache.extraction.engine import ExtractOptions, parse_sites
from depthcache.extraction.engine import extract as run_extract
from depthcache.extraction.windows import Documents
from depthcache.model import LoadedModel, Placement, main_device, wrap_model
from depthcache.store.layout import SITES

OPTION_NAMES = ("seq_len", "batch_size", "dtype", "top_k", "chunk_tokens", "shard_mib", "device", "resume", "progress")
PLACEMENT_NAMES = ("device_map", "max_memory", "offload_folder", "model_dtype")  # Placement's fields


def layer_spec(layers: str | int | Iterable[int]) -> str:
    """'all', '0-5,10', 7, range(0, 30, 2) or [0, 3] → the layer spec string extraction records."""
    if isinstance(layers, str):
        return layers
    if isinstance(layers, int):
        return str(layers)
    values = list(layers)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DepthcacheError(f"layers must be 'all', a spec such as '0-5,10', or integers, got {layers!r}")
    return ",".join(map(str, values))


def resolve_model(model: Any, tokenizer: Any, device: str | None) -> tuple[LoadedModel | None, str, str]:
    """(loaded model or None to load by spec, the spec recorded, the device) for what the caller passed."""
    if isinstance(model, (str, os.PathLike)):
        return None, str(model), device or "auto"
    if isinstance(model, LoadedModel):
        return model, str(model.provenance["spec"]), device or main_device(model.model)
    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    where = main_device(model) if hasattr(model, "parameters") else "cpu"  # never moved: a dispatched model
    # (from_pretrained(device_map=...)) runs where its device map put it
    if device is not None and device not in (where, "auto"):
        raise DepthcacheError(f"the model is on {where}, not {device}: move it first (model.to({device!r})) or drop "
                              "device=")
    loaded = wrap_model(model, tokenizer)
    return loaded, str(loaded.provenance["spec"]), where


def resolve_data(data: Any, fields: DataFields) -> tuple[Documents | None, str]:
    """(documents, or None to read the spec, the dataset spec recorded) for what the caller passed."""
    if isinstance(data, os.PathLike):
        data = str(data)
    if isinstance(data, str):
        if not (data in BUILTIN_DATASETS or data.startswith("task:") or Path(data).expanduser().exists()):
            raise DepthcacheError(f"{data[:60]!r} is no dataset spec or existing path; to extract a text, pass a list "
                                  "of strings: depthcache.extract(model, [text], out=...)")
        return None, data
    docs = python_documents(data, fields)
    return docs, docs.name


def extract(model: Any, data: Any = "pydoc-topics", *, out: str | os.PathLike[str], tokenizer: Any = None,
            sites: str | Iterable[str] = SITES, layers: str | int | Iterable[int] = "all",
            max_tokens: int | None = 16384, text_field: str = "text", prompt_field: str | None = None,
            answer_field: str = "answer", answer_after: str | None = None, answer_regex: str | None = None,
            split: str | None = None, device: str | None = None, **options: Any) -> xr.Dataset:
    """Extract ``model``'s activations on ``data`` into the store ``out`` and return it opened (``depthcache.open``).

    ``model``: a transformers model with ``tokenizer=``, a ``(model, tokenizer)`` pair, or a spec as ``--model``
    takes. ``data``: an iterable of strings, a ``datasets.Dataset`` (its ``text_field``), dicts, task items, or a
    spec as ``--data`` takes. With ``prompt_field`` the records are task items (prompt, answer) and each becomes one
    window. ``options``: seq_len, batch_size, dtype, top_k, chunk_tokens, shard_mib, resume, progress, and for a
    model named by spec device_map, max_memory, offload_folder, model_dtype (as the CLI's; a model object, dispatched
    or not, runs where it is, in its own dtype)."""
    unknown = sorted(set(options) - set(OPTION_NAMES) - set(PLACEMENT_NAMES))
    if unknown:
        raise DepthcacheError(f"unknown option(s) {', '.join(unknown)}; extract takes "
                              f"{', '.join(OPTION_NAMES + PLACEMENT_NAMES)}")
    placement = Placement(**{name: options.pop(name) for name in PLACEMENT_NAMES if name in options})
    fields = DataFields(text_field, prompt_field, answer_field, answer_after, answer_regex, split)
    docs, data_spec = resolve_data(data, fields)
    loaded, model_spec, where = resolve_model(model, tokenizer, device)
    if loaded is not None and placement != Placement():
        raise DepthcacheError(f"{', '.join(n for n in PLACEMENT_NAMES if getattr(placement, n) is not None)} place a "
                              "model named by spec; a model object runs where it is: dispatch it yourself "
                              "(from_pretrained(..., device_map='auto', max_memory=..., offload_folder=...))")
    options.setdefault("progress", False)
    opts = ExtractOptions(out=str(out), model=model_spec, data=data_spec, sites=parse_sites(
        sites if isinstance(sites, str) else tuple(sites)), layers=layer_spec(layers), max_tokens=max_tokens or None,
        device=where, fields=fields, placement=placement, **options)
    run_extract(opts, loaded, docs)
    from depthcache.store.backend import open_store

    return open_store(str(out))
