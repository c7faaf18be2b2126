"""Location maps: the prompt/answer tokens a map is computed on, and the Zarr v3 store a map is written to.

A map store is a plain xarray Dataset written with ``to_zarr`` (Zarr v3) whose attribute ``depthcache_map``
identifies it (kind, schema, model, reference); see docs/store-format.md, "Location maps".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from depthcache.errors import DepthcacheError
from depthcache.extraction.windows import bos_token_id
from depthcache.store.io import write_dataset_atomically

MAP_ATTR = "depthcache_map"
MAP_SCHEMA = "1.2"  # 1.1: igrad adds intervals, error_bound and the tolerance, max_steps attributes; 1.2: the
# measure's choices (the paper's or ours) as attributes, erasure's max_distribution_l2, a final-residual row L
READABLE_MAP_SCHEMAS = ("1", "1.1", MAP_SCHEMA)
KINDS = ("erasure", "igrad")  # the layer × position maps of erase and igrad
MAP_KINDS = (*KINDS, "hop-depth")  # every kind of map store


@dataclass(frozen=True)
class Prompt:
    """A teacher-forced input: prompt tokens then all answer tokens but the last, with the answer tokens to score."""

    prompt: str
    answer: str
    input_ids: tuple[int, ...]  # prompt (with BOS when the tokenizer adds one) + answer[:-1]
    answer_ids: tuple[int, ...]
    n_prompt: int  # input positions belonging to the prompt
    labels: tuple[str, ...]  # one decoded string per input position
    answer_labels: tuple[str, ...]  # one decoded string per answer token

    @property
    def n_answer(self) -> int:
        """Answer tokens; their probabilities are read at the last ``n_answer`` input positions."""
        return len(self.answer_ids)


def encode(tokenizer, prompt: str, answer: str, max_positions: int | None) -> Prompt:  # noqa: ANN001 - HF tokenizer
    """Tokenize prompt and prompt+answer; the answer is the continuation, refused when it is not one."""
    if not prompt or not answer:
        raise DepthcacheError("both --prompt and --answer must be non-empty strings")
    alone = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    joint = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
    if joint[:len(alone)] != alone or len(joint) == len(alone):
        raise DepthcacheError(
            f"answer {answer!r} is not a token continuation of prompt {prompt!r}: the tokens of prompt+answer do not "
            "start with the prompt's tokens; move the boundary (e.g. put a leading space into the answer, not the "
            "prompt)")
    bos = bos_token_id(tokenizer)
    ids = ([bos] if bos is not None else []) + joint[:-1]
    if max_positions is not None and len(ids) > max_positions:
        raise DepthcacheError(f"prompt+answer is {len(ids)} tokens but the model's context is {max_positions}: "
                              "use a shorter prompt")
    answer_ids = tuple(joint[len(alone):])
    return Prompt(prompt, answer, tuple(ids), answer_ids, int(bos is not None) + len(alone), decoded(tokenizer, ids),
                  decoded(tokenizer, answer_ids))


def decoded(tokenizer, ids: Sequence[int]) -> tuple[str, ...]:  # noqa: ANN001 - any HF tokenizer
    """Each token id decoded on its own (the tick labels of a map)."""
    return tuple(tokenizer.decode([i]) for i in ids)


def context_length(config: Any) -> int | None:
    """The model's maximum number of positions, when its config states one."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def is_map(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` is a Zarr group carrying the ``depthcache_map`` attribute."""
    meta = Path(location) / "zarr.json"
    if not meta.is_file():
        return False
    import json

    return MAP_ATTR in json.loads(meta.read_text()).get("attributes", {})


def read_map(location: str | os.PathLike[str]) -> xr.Dataset:
    """A location map, loaded into memory, or a clear error when ``location`` is not one."""
    if not is_map(location):
        raise DepthcacheError(f"{location} is not a depthcache location map (made by `depthcache erase`, `igrad` or "
                              "`hop-depth`)")
    ds = xr.open_zarr(str(location), consolidated=False).load()
    found = ds.attrs[MAP_ATTR].get("schema")
    if found not in READABLE_MAP_SCHEMAS:
        raise DepthcacheError(f"{location} is a location map of schema {found!r}; this depthcache reads schemas "
                              f"{', '.join(READABLE_MAP_SCHEMAS)}: upgrade depthcache or recompute the map")
    return ds


def check_out(out: str) -> None:
    """Refuse an --out that exists and is not a location map (an earlier map there is replaced)."""
    path = Path(out)
    if path.exists() and not is_map(path):
        raise DepthcacheError(f"{out} exists and is not a depthcache location map; refusing to overwrite it: choose "
                              "another --out")


def write_map(ds: xr.Dataset, out: str) -> Path:
    """Write a map atomically: into a hidden sibling, then renamed over ``out`` (never a partial store)."""
    check_out(out)
    dest = Path(out)
    write_dataset_atomically(ds, dest)
    return dest


def map_dataset(prompt: Prompt, n_layers: int, layers: Sequence[int], data_vars: dict[str, Any]) -> xr.Dataset:
    """One prompt's map of ``layers`` (of a model with ``n_layers``): the variables with ``layer`` (+
    ``relative_depth``), ``position`` (+ ``token``) and ``answer_position`` (+ ``answer_token``) coordinates, and the
    prompt and answer as attributes."""
    layers = np.asarray(layers, dtype=np.int64)
    coords = {"layer": layers, "relative_depth": ("layer", layers / n_layers),
              "position": np.arange(len(prompt.input_ids)), "token": ("position", np.array(prompt.labels, dtype=object)),
              "answer_position": np.arange(prompt.n_answer),
              "answer_token": ("answer_position", np.array(prompt.answer_labels, dtype=object))}
    return xr.Dataset(data_vars, coords=coords,
                      attrs={"prompt": prompt.prompt, "answer": prompt.answer, "n_prompt_tokens": prompt.n_prompt})


# (layer, compute) -> that layer's row of a map: computed, or taken from where an interrupted run saved it
Rows = Callable[[int, Callable[[], dict[str, np.ndarray]]], dict[str, np.ndarray]]


def computed(layer: int, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The default ``Rows``: compute the layer's row (``locate`` passes one that saves rows and reuses saved ones)."""
    return compute()


PER_ITEM = ("prompt", "answer", "n_prompt_tokens")


def stack_items(maps: list[xr.Dataset], ids: list[str]) -> xr.Dataset:
    """Maps of several prompts as one dataset with an ``item`` dim, padded along ``position``/``answer_position`` (NaN, '');
    each map's prompt, answer, n_prompt_tokens and length (``n_positions``) become per-item variables."""
    parts = [m.reset_coords(["token", "answer_token"]).assign(
        {**{k: m.attrs[k] for k in PER_ITEM}, "n_positions": m.sizes["position"]}) for m in maps]
    joined = xr.concat(parts, dim=pd.Index(np.array(ids, dtype=object), name="item"), join="outer", combine_attrs="drop", fill_value=np.nan)
    labels = {name: joined[name].fillna("").astype(object) for name in ("token", "answer_token")}
    texts = {name: joined[name].astype(object) for name in ("prompt", "answer")}
    return joined.drop_vars(list(labels)).assign_coords(labels).assign(texts)


def item_info(m: xr.Dataset) -> dict[str, Any]:
    """prompt, answer, n_prompt_tokens and n_positions of a single-prompt map or of one item of a batch map."""
    if "n_positions" in m:
        return {k: m[k].item() for k in (*PER_ITEM, "n_positions")}
    return {**{k: m.attrs[k] for k in PER_ITEM}, "n_positions": m.sizes["position"]}
