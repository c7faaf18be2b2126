"""Validation of a store against the store-format contract: JSON Schema of the attributes, shapes, checksums."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema
import numpy as np
import zarr
from zarr.core.sync import sync

from depthcache.errors import DepthcacheError
from depthcache.store.io import open_group, read_attrs
from depthcache.store.layout import ARRAYS, ATTRS_KEY, array_dtype, array_shape

# Bounds no real store reaches, checked before anything is allocated or scheduled from a store's metadata.
MAX_CHUNKS = 2**22
MAX_CHUNK_BYTES = 2**30
MAX_D_MODEL = 2**17
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@cache
def load_schema(name: str = "store.schema.json") -> dict[str, Any]:
    """A JSON Schema shipped in the package (identical to the published copy in the repository's schemas/)."""
    return json.loads(files("depthcache.store").joinpath(name).read_text(encoding="utf-8"))


def attr_problems(attrs: Any) -> list[str]:
    """Every way ``attrs`` breaks the store schema, as 'path: message' lines (empty when valid)."""
    validator = jsonschema.Draft202012Validator(load_schema())
    return [f"attributes.{ATTRS_KEY}.{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(attrs), key=lambda e: list(map(str, e.absolute_path)))]


def limit_problems(attrs: dict[str, Any]) -> list[str]:
    """Schema-valid values that are inconsistent or too large to be real (checked before allocating from them)."""
    m, o, lay, p = attrs["model"], attrs["options"], attrs["layout"], attrs["progress"]
    problems = []
    if p["tokens_committed"] > lay["n_tokens"]:
        problems.append(f"progress.tokens_committed {p['tokens_committed']} exceeds layout.n_tokens {lay['n_tokens']}")
    if max(o["layers"]) >= m["n_layers"]:
        problems.append(f"options.layers mentions layer {max(o['layers'])} of a {m['n_layers']}-layer model")
    if m["d_model"] > MAX_D_MODEL:
        problems.append(f"model.d_model {m['d_model']} exceeds {MAX_D_MODEL}")
    if o["top_k"] > m["vocab_size"]:
        problems.append(f"options.top_k {o['top_k']} exceeds model.vocab_size {m['vocab_size']}")
    if math.ceil(lay["n_tokens"] / lay["chunk_tokens"]) > MAX_CHUNKS:
        problems.append(f"layout.n_tokens {lay['n_tokens']} / chunk_tokens {lay['chunk_tokens']} gives more than "
                        f"{MAX_CHUNKS} chunks")
    chunk_bytes = lay["chunk_tokens"] * len(o["layers"]) * min(m["d_model"], MAX_D_MODEL) * ITEMSIZE[o["dtype"]]
    if chunk_bytes > MAX_CHUNK_BYTES:
        problems.append(f"one chunk would take {chunk_bytes / 2**30:.1f} GiB (limit {MAX_CHUNK_BYTES // 2**30} GiB)")
    return [f"attributes.{ATTRS_KEY}: {p}" for p in problems]


def check_attrs(attrs: Any) -> dict[str, Any]:
    """Return ``attrs`` if valid, else raise a DepthcacheError listing the problems."""
    problems = attr_problems(attrs) or limit_problems(attrs)
    if problems:
        raise DepthcacheError("store attributes do not match the depthcache schema:\n  " + "\n  ".join(problems[:10]))
    return attrs


def expected_arrays(attrs: dict[str, Any]) -> list[str]:
    """Every array of the format the attributes promise, in table order."""
    sites = attrs["options"]["sites"]
    groups = {"base"} | ({"task"} if "task" in attrs["dataset"] else set())  # schema 1.2 task stores
    groups |= {"run"} if "intervention" in attrs else set()  # a run's arrays are checked where present
    return [name for name, spec in ARRAYS.items() if spec.group in groups and (spec.site is None or spec.site in sites)]


def expected_metadata(attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The zarr metadata (shape, chunk shape, data type, dimension names) every known array must have."""
    lay, opts = attrs["layout"], attrs["options"]
    result = {}
    for name in expected_arrays(attrs):
        dims = ARRAYS[name].dims
        shape = array_shape(name, lay["n_tokens"], len(opts["layers"]), attrs["model"]["d_model"], opts["top_k"])
        result[name] = {"shape": list(shape), "dimension_names": list(dims),
                        "data_type": array_dtype(name, opts["dtype"]),
                        "chunk_shape": [lay["chunk_tokens"] if d == "token" else n for d, n in zip(dims, shape)]}
    return result


def array_metadata(arrays: Mapping[str, zarr.Array], name: str) -> dict[str, Any]:
    """An array's zarr.json as a dict, with unreadable metadata reported as a DepthcacheError."""
    try:
        meta = arrays[name].metadata.to_dict()
    except Exception as exc:  # noqa: BLE001 - untrusted metadata may break zarr's parser in any way
        raise DepthcacheError(f"array {name!r} has unreadable metadata ({type(exc).__name__}: {exc})") from exc
    codecs = [c.get("name") if isinstance(c, dict) else None for c in meta.get("codecs", ())]
    return {"shape": list(meta["shape"]), "dimension_names": list(meta.get("dimension_names") or ()),
            "data_type": str(meta["data_type"]), "chunk_shape": list(meta["chunk_grid"]["configuration"]["chunk_shape"]),
            "chunk_key_encoding": meta["chunk_key_encoding"], "checksummed": codecs[-1:] == ["crc32c"]}


def structure_problems(arrays: Mapping[str, zarr.Array], attrs: dict[str, Any], require_all: bool = True
                       ) -> list[str]:
    """Arrays missing (when ``require_all``) or whose metadata differs from what the attributes promise."""
    present = set(arrays)
    problems = []
    for name, expected in expected_metadata(attrs).items():
        if name not in present:
            problems += [f"array {name!r} is missing"] if require_all else []
            continue
        try:
            meta = array_metadata(arrays, name)
        except DepthcacheError as exc:
            problems.append(str(exc))
            continue
        problems += [f"array {name!r} has {key} {meta[key]}, expected {value}"
                     for key, value in expected.items() if meta[key] != value]
        if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
            problems.append(f"array {name!r} has chunk key encoding {meta['chunk_key_encoding']}, expected default '/'")
        if not meta["checksummed"]:
            problems.append(f"array {name!r} has no crc32c checksum codec")
    if not problems and "layer" in present:
        problems += layer_problems(arrays, attrs)
    return problems


def layer_problems(arrays: Mapping[str, zarr.Array], attrs: dict[str, Any]) -> list[str]:
    """The ``layer`` coordinate must list the stored layers of the attributes."""
    stored = attrs["options"]["layers"]
    try:
        meta = array_metadata(arrays, "layer")
        if meta["shape"] != [len(stored)] or meta["data_type"] != "int32":
            return [f"array 'layer' has shape {meta['shape']} and type {meta['data_type']}, expected "
                    f"[{len(stored)}] int32"]
        values = arrays["layer"][...].tolist()
    except Exception as exc:  # noqa: BLE001 - any decode failure of untrusted bytes is a problem to report
        return [f"array 'layer' is unreadable ({type(exc).__name__}: {exc})"]
    return [] if values == stored else [f"array 'layer' holds {values}, expected options.layers {stored}"]


async def _keys(store: Any, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]


def missing_chunk_problems(group: zarr.Group, arrays: Mapping[str, zarr.Array], names: list[str], tokens: int
                           ) -> list[str]:
    """Committed chunks whose objects are absent (they would silently read as zeros)."""
    prefix = f"{group.path}/" if group.path else ""
    if hasattr(getattr(group.store, "fs", None), "invalidate_cache"):
        group.store.fs.invalidate_cache()  # remote listings may be cached from before a copy
    present = set(sync(_keys(group.store, prefix)))
    problems = []
    for name in names:
        array = arrays[name]
        axis = array.metadata.dimension_names.index("token")
        for index in range(math.ceil(tokens / array.chunks[axis])):
            coords = [index if i == axis else 0 for i in range(array.ndim)]
            key = f"{prefix}{name}/c/" + "/".join(map(str, coords))
            if key not in present:
                problems.append(f"array {name!r} token chunk {index} is missing ({key})")
    return problems


def check_store(group: zarr.Group) -> dict[str, Any]:
    """A store's (or run's) attributes, after checking schema, limits, array metadata and committed chunks' presence.

    Everything that opens a store for reading goes through this, so untrusted stores are refused before any
    array is allocated or any task is scheduled from their metadata."""
    attrs = check_attrs(read_attrs(group))
    with unreadable_metadata_as_error(group):
        arrays = dict(group.arrays())  # each zarr.json read once (every read is a request on object storage)
        names = [name for name in expected_metadata(attrs) if name in arrays]
        problems = (structure_problems(arrays, attrs, require_all="intervention" not in attrs)
                    or missing_chunk_problems(group, arrays, names, attrs["progress"]["tokens_committed"]))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DepthcacheError(f"store {group.store}{'/' + group.path if group.path else ''} is damaged: "
                              f"{problems[0]}{more}; run depthcache validate for details")
    return attrs


def chunk_problems(group: zarr.Group, names: list[str], tokens: int) -> list[str]:
    """Read every committed chunk of the named arrays; report those whose bytes fail to decode or checksum."""
    problems = []
    for name in names:
        array = group[name]
        axis = array.metadata.dimension_names.index("token")
        step = array.chunks[axis]
        for index, start in enumerate(range(0, tokens, step)):
            region = [slice(None)] * array.ndim
            region[axis] = slice(start, min(start + step, tokens))
            try:
                values = array[tuple(region)]
            except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt chunk to report
                problems.append(f"array {name!r} token chunk {index} (tokens {start}..{start + step - 1}): "
                                f"{type(exc).__name__}: {exc}")
                continue
            if values.dtype.kind == "f" and not np.isfinite(values.astype(np.float32)).all() and name != "next_logprob":
                problems.append(f"array {name!r} token chunk {index}: non-finite values")
    return problems


def group_problems(group: zarr.Group, read_chunks: bool) -> list[str]:
    """Problems of one store or run group: schema, limits, array metadata, missing and (optionally) corrupt chunks."""
    attrs = read_attrs(group)
    problems = attr_problems(attrs) or limit_problems(attrs)
    if problems:
        return problems
    arrays = dict(group.arrays())
    problems = structure_problems(arrays, attrs, require_all="intervention" not in attrs)
    if problems:
        return problems
    names = [name for name in expected_metadata(attrs) if name in arrays]
    tokens = attrs["progress"]["tokens_committed"]
    problems = missing_chunk_problems(group, arrays, names, tokens)
    if read_chunks and not problems:
        problems += chunk_problems(group, names, tokens)
    return problems


def validate_store(location: str, read_chunks: bool = True,
                   storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """All problems found in a store and its runs: schema, shapes, missing chunks, and (optionally) checksums."""
    group = open_group(location, "r", storage_options=storage_options)
    with unreadable_metadata_as_error(group):
        problems = group_problems(group, read_chunks)
        runs = sorted(group["runs"].group_keys()) if not problems and "runs" in group.group_keys() else []
        for name in runs:
            problems += [f"runs/{name}: {p}" for p in group_problems(group[f"runs/{name}"], read_chunks)]
    return problems


@contextmanager
def unreadable_metadata_as_error(group: zarr.Group) -> Iterator[None]:
    """A member's zarr.json that zarr cannot parse (bad JSON, unknown type, wrong fields) as a DepthcacheError."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError, zarr.errors.NodeTypeValidationError) as exc:
        raise DepthcacheError(f"store {group.store} has unreadable array metadata "
                              f"({type(exc).__name__}: {exc}); it is damaged or not a depthcache store") from exc
