"""Validation of a store against the store-format contract: JSON Schema of the attributes, limits, shapes, chunks'
presence and sizes, and (``validate``) every checksum: activations, token metadata, model head, tokenizer files and
cached analysis results. The work is bounded by what exists: the store is listed once and every check streams
over that listing, and the problems reported are capped (MAX_REPORTED_PROBLEMS lines, the rest counted)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema
import numpy as np
import zarr
from zarr.codecs.sharding import MAX_UINT_64
from zarr.core.sync import sync

from depthcache.codecs import entry_past, index_entries_problem
from depthcache.errors import DepthcacheError
from depthcache.limits import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_D_MODEL,
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    MAX_RESULT_BYTES,
    max_object_bytes,
)
from depthcache.store.arrays import holds_bits, open_arrays
from depthcache.store.complete import result_chunk_problems
from depthcache.store.head import head_problems
from depthcache.store.io import (
    METADATA,
    NOT_A_FILE,
    check_json_depth,
    json_depth,
    object_listing,
    open_group,
    read_attrs,
    version_tuple,
)
from depthcache.store.layout import (
    ARRAYS,
    ATTRS_KEY,
    CHECKSUMMED_HEAD,
    PART_PREFIX,
    PARTS_SITE,
    array_dtype,
    array_shape,
    array_spec,
    is_checksummed,
    part_modules,
)
from depthcache.store.leftovers import leftover_problems
from depthcache.store.problems import (
    MAX_KEYS,
    Problems,
    chunk_key,
    chunks_by_array,
    grid_coords,
    grid_problems,
)
from depthcache.store.shard_read import layered_block

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
READ_THREADS = 4  # validate decodes this many chunks at once
ANALYSES = "analyses"
UNCHECKSUMMED_RESULTS_NOTE = ("cached analyses written before schema 1.3 are not checksummed: recompute them with "
                              "depthcache analyze NAME STORE --force")


@cache
def load_schema(name: str = "store.schema.json") -> dict[str, Any]:
    """A JSON Schema shipped in the package (identical to the published copy in the repository's schemas/)."""
    return json.loads(files("depthcache.store").joinpath(name).read_text(encoding="utf-8"))


def attr_problems(attrs: Any) -> list[str]:
    """Every way ``attrs`` breaks the store schema, as 'path: message' lines (empty when valid; messages cut short,
    since they quote the offending value)."""
    validator = jsonschema.Draft202012Validator(load_schema())
    return [f"attributes.{ATTRS_KEY}.{'.'.join(map(str, e.absolute_path)) or '(root)'}: {error_message(e)}"
            for e in sorted(validator.iter_errors(attrs), key=lambda e: list(map(str, e.absolute_path)))]


def error_message(error: jsonschema.ValidationError) -> str:
    """A schema error's message with the offending value cut short (it may be megabytes long)."""
    value = repr(error.instance)
    return shorten(error.message.replace(value, shorten(value, 60)) if len(value) > 60 else error.message)


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out (store values may be huge)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


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
    problems += chunking_problems(lay["n_tokens"], lay["chunk_tokens"], len(o["layers"]),
                                  min(m["d_model"], MAX_D_MODEL), ITEMSIZE[o["dtype"]])
    shard = lay.get("token_shard_tokens")
    if shard is not None and (shard % lay["chunk_tokens"]
                              or shard * min(m["d_model"], MAX_D_MODEL) * ITEMSIZE[o["dtype"]] > MAX_CHUNK_BYTES):
        problems.append(f"layout.token_shard_tokens {shard} is not a multiple of chunk_tokens {lay['chunk_tokens']} "
                        f"or makes a shard larger than {MAX_CHUNK_BYTES / 2**30:g} GiB")
    return [f"attributes.{ATTRS_KEY}: {p}" for p in problems]


def chunking_problems(n_tokens: int, chunk_tokens: int, n_layers: int, d_model: int, itemsize: int) -> list[str]:
    """The chunk count and chunk size limits (the same for a reader checking a store and a writer creating one)."""
    problems = []
    if math.ceil(n_tokens / chunk_tokens) > MAX_CHUNKS:
        problems.append(f"layout.n_tokens {n_tokens} / chunk_tokens {chunk_tokens} gives more than {MAX_CHUNKS:,} "
                        "chunks per array")
    chunk_bytes = chunk_tokens * n_layers * d_model * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        problems.append(f"one chunk of {chunk_tokens} tokens would take {chunk_bytes / 2**30:.1f} GiB "
                        f"(limit {MAX_CHUNK_BYTES / 2**30:g} GiB)")
    return problems


def check_attrs(attrs: Any) -> dict[str, Any]:
    """Return ``attrs`` if valid, else raise a DepthcacheError listing the problems."""
    check_json_depth(attrs, f"attributes.{ATTRS_KEY}")
    problems = attr_problems(attrs) or limit_problems(attrs)
    if problems:
        raise DepthcacheError("store attributes do not match the depthcache schema:\n  " + "\n  ".join(problems[:10]))
    return attrs


def expected_arrays(attrs: dict[str, Any]) -> list[str]:
    """Every array of the format the attributes promise, in table order."""
    sites = attrs["options"]["sites"]
    groups = {"base"} | ({"task"} if "task" in attrs["dataset"] else set())  # schema 1.2 task stores
    groups |= {"run"} if "intervention" in attrs else set()  # a run's arrays are checked where present
    names = [name for name, spec in ARRAYS.items() if spec.group in groups and (spec.site is None or spec.site in sites)]
    if PARTS_SITE in sites:  # 2.2: one array per branch module the branch table has several of in a role
        structure = attrs["model"].get("structure") or {}
        names += [PART_PREFIX + p for p in part_modules(structure.get("attn") or [], structure.get("mlp") or [])]
    return names


def expected_metadata(attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The zarr metadata (shape, chunk and shard shapes, data type, dimension names) every known array must have:
    unsharded in 1.x layouts; in 2.0 (``layout.token_shard_tokens``) sharded, one inner chunk per layer."""
    lay, opts = attrs["layout"], attrs["options"]
    token_shard = lay.get("token_shard_tokens")
    result = {}
    for name in expected_arrays(attrs):
        dims = array_spec(name).dims
        shape = array_shape(name, lay["n_tokens"], len(opts["layers"]), attrs["model"]["d_model"], opts["top_k"])
        chunks = [lay["chunk_tokens"] if d == "token" else n for d, n in zip(dims, shape)]
        shards = None
        if token_shard is not None:
            shard_tokens = lay["chunk_tokens"] if "layer" in dims else token_shard
            shards = [shard_tokens if d == "token" else n for d, n in zip(dims, shape)]
            chunks = [1 if d == "layer" else n for d, n in zip(dims, chunks)]
        result[name] = {"shape": list(shape), "dimension_names": list(dims),
                        "data_type": array_dtype(name, opts["dtype"]), "chunk_shape": chunks, "shard_shape": shards}
    return result


def array_metadata(arrays: Mapping[str, zarr.Array], name: str) -> dict[str, Any]:
    """An array's zarr.json as a dict (``chunk_shape``: the inner chunks of a sharded array, ``shard_shape``: its
    shards or None), with unreadable metadata reported as a DepthcacheError."""
    try:
        meta = arrays[name].metadata.to_dict()
        grid = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = list(meta["codecs"])
        sharding = codecs[0] if len(codecs) == 1 and codec_name(codecs[0]) == "sharding_indexed" else None
        if sharding is None:
            chunks, shards, checksummed = grid, None, is_checksummed(codecs)
        else:
            config = sharding["configuration"]
            chunks, shards = list(config["chunk_shape"]), grid
            checksummed = is_checksummed(list(config["codecs"])) and is_checksummed(list(config["index_codecs"]))
        return {"shape": list(meta["shape"]), "dimension_names": list(meta.get("dimension_names") or ()),
                "data_type": str(meta["data_type"]), "chunk_shape": chunks, "shard_shape": shards,
                "chunk_key_encoding": meta["chunk_key_encoding"], "checksummed": checksummed}
    except Exception as exc:  # noqa: BLE001 - untrusted metadata may break zarr's parser in any way
        raise DepthcacheError(f"array {name!r} has unreadable metadata ({type(exc).__name__}: "
                              f"{shorten(str(exc))})") from exc


def codec_name(codec: Any) -> str | None:
    """The name of a codec given as its zarr.json dict or as a codec object."""
    return codec.get("name") if isinstance(codec, dict) else codec.to_dict().get("name")


def structure_problems(arrays: Mapping[str, zarr.Array], attrs: dict[str, Any], problems: Problems,
                       require_all: bool = True) -> None:
    """Arrays missing (when ``require_all``) or whose metadata differs from what the attributes promise."""
    before = problems.count
    for name, expected in expected_metadata(attrs).items():
        if name not in arrays:
            if require_all:
                problems.add(f"array {name!r} is missing")
            continue
        try:
            meta = array_metadata(arrays, name)
        except DepthcacheError as exc:
            problems.add(str(exc))
            continue
        for key, value in expected.items():
            if meta[key] != value:
                problems.add(f"array {name!r} has {key} {shorten(str(meta[key]))}, expected {value}")
        if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
            problems.add(f"array {name!r} has chunk key encoding {shorten(str(meta['chunk_key_encoding']))}, "
                         "expected default '/'")
        if not meta["checksummed"]:
            problems.add(f"array {name!r} has no crc32c checksum codec"
                         f"{' on its inner chunks and shard index' if meta['shard_shape'] else ''}")
    if problems.count == before and "layer" in arrays:
        layer_problems(arrays, attrs, problems)


def layer_problems(arrays: Mapping[str, zarr.Array], attrs: dict[str, Any], problems: Problems) -> None:
    """The ``layer`` coordinate must list the stored layers of the attributes."""
    stored = attrs["options"]["layers"]
    try:
        meta = array_metadata(arrays, "layer")
        if meta["shape"] != [len(stored)] or meta["data_type"] != "int32" or meta["chunk_shape"] != [len(stored)]:
            problems.add(f"array 'layer' has shape {meta['shape']}, chunks {meta['chunk_shape']} and type "
                         f"{meta['data_type']}, expected [{len(stored)}] int32 in one chunk")
            return
        values = arrays["layer"][...].tolist()
    except Exception as exc:  # noqa: BLE001 - any decode failure of untrusted bytes is a problem to report
        problems.add(f"array 'layer' is unreadable ({type(exc).__name__}: {shorten(str(exc))})", "layer/c/0")
        return
    if values != stored:
        problems.add(f"array 'layer' holds {shorten(str(values))}, expected options.layers {stored}", "layer/c/0")


def object_problems(objects: Mapping[str, int], problems: Problems) -> None:
    """Objects no reader may open: anything that is not a regular file, metadata larger than MAX_METADATA_BYTES,
    or anything larger than the largest chunk the limits allow."""
    largest = max_object_bytes(MAX_CHUNK_BYTES)
    for key, size in objects.items():
        if size == NOT_A_FILE:
            problems.add(f"{key} is not a regular file", key)
        elif key.rsplit("/", 1)[-1] == METADATA and size > MAX_METADATA_BYTES:
            problems.add(f"{key} is {size:,} bytes, more than the {MAX_METADATA_BYTES:,} metadata may take", key)
        elif size > largest:
            problems.add(f"{key} is {size:,} bytes, more than any chunk may take ({largest:,})", key)


def committed_chunk_problems(arrays: Mapping[str, zarr.Array], names: list[str], tokens: int,
                             chunks: Mapping[str, Mapping[tuple[int, ...], int]], problems: Problems) -> None:
    """Committed objects (chunks, or 2.0 shards) that are absent (they would silently read as zeros) or larger than
    one can be."""
    for name in names:
        array = arrays[name]
        axis = array.metadata.dimension_names.index("token")
        objects = object_shape(array)
        grid = tuple(math.ceil(tokens / c) if i == axis else 1 for i, c in enumerate(objects))
        grid_problems(name, grid, chunks.get(name, {}), max_stored_bytes(array), problems,
                      "committed shard" if array.shards else "committed chunk")


def object_shape(array: zarr.Array) -> tuple[int, ...]:
    """The shape one stored object of ``array`` covers: its shard (2.0) or its chunk."""
    return tuple(array.shards or array.chunks)


def max_stored_bytes(array: zarr.Array) -> int:
    """Largest object ``array`` can legitimately store: a chunk (see ``max_object_bytes``), or a shard of such
    inner chunks plus its index (16 bytes per inner chunk and a crc32c)."""
    inner = max_object_bytes(math.prod(array.chunks) * array.dtype.itemsize)
    if not array.shards:
        return inner
    n_inner = math.prod(s // c for s, c in zip(array.shards, array.chunks))
    return n_inner * (inner + 16) + 4


def store_problems(group: zarr.Group, attrs: dict[str, Any], objects: Mapping[str, int], problems: Problems,
                   read: bool, results: bool = True) -> None:
    """Every check of one store or run group whose attributes are valid, from one listing of its objects (cached
    analyses too with ``results``); with ``read``, every committed chunk, the model head, the tokenizer files and
    the cached analyses decoded and checked."""
    object_problems(objects, problems)
    if problems:
        return
    arrays = open_arrays(group)  # each zarr.json read once; bf16 as bit patterns (no ml_dtypes)
    for name, array in arrays.items():  # before xarray copies attributes recursively
        if json_depth(array.metadata.attributes) > MAX_JSON_DEPTH:
            problems.add(f"array {name!r} has attributes nested more than {MAX_JSON_DEPTH} levels deep")
    if problems:
        return
    structure_problems(arrays, attrs, problems, require_all="intervention" not in attrs)
    if problems:
        return
    chunks = chunks_by_array(objects)
    names = [name for name in expected_metadata(attrs) if name in arrays]
    tokens = attrs["progress"]["tokens_committed"]
    committed_chunk_problems(arrays, names, tokens, chunks, problems)
    if "intervention" not in attrs:
        head_problems(group, attrs, chunks, problems, read and not problems)
    if read and not problems:
        read_chunk_problems(arrays, names, tokens, problems)
    if results and "intervention" not in attrs and ANALYSES in group.group_keys():
        analyses_problems(group[ANALYSES], attrs, problems, read)


def check_store(group: zarr.Group) -> dict[str, Any]:
    """A store's (or run's) attributes, after checking schema, limits, objects, array metadata, the model head's
    structure and committed chunks' presence and sizes (nothing is decoded).

    Everything that opens a store for reading goes through this, so untrusted stores are refused before any
    array is allocated or any task is scheduled from their metadata. Cached analyses are not part of this check:
    a damaged one is recomputed, never trusted, and validate reports it."""
    attrs = check_attrs(read_attrs(group))
    problems = Problems()
    with unreadable_metadata_as_error(group):
        store_problems(group, attrs, object_listing(group), problems, read=False, results=False)
    if problems:
        more = f" (and {problems.count - 1:,} more)" if problems.count > 1 else ""
        raise DepthcacheError(f"store {group.store}{'/' + group.path if group.path else ''} is damaged: "
                              f"{problems.lines[0]}{more}; run depthcache validate for details")
    return attrs


def read_chunk_problems(arrays: Mapping[str, zarr.Array], names: list[str], tokens: int, problems: Problems) -> None:
    """Decode every committed chunk of the named arrays (crc32c, bounded zstd), READ_THREADS at a time (decoding
    and the checks release the GIL); report those that fail or hold non-finite values where none may be."""
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for name in names:
            array = arrays[name]
            axis = array.metadata.dimension_names.index("token")
            step = array.chunks[axis]
            bad = shard_index_problems(array, name, tokens, problems) if array.shards else set()
            starts = list(range(0, tokens, step))
            keys = [chunk_key(name, tuple(start // object_shape(array)[axis] if i == axis else 0
                                          for i in range(array.ndim))) for start in starts]
            todo = [(index, start, key) for index, (start, key) in enumerate(zip(starts, keys)) if key not in bad]
            found = pool.map(lambda job: chunk_problem(array, name, axis, job[1], min(job[1] + step, tokens)), todo)
            for (index, start, key), problem in zip(todo, found):  # a shard whose index is reported is not re-read
                problems.count_read("activation and token chunks (crc32c)")
                if problem:
                    problems.add(f"array {name!r} token chunk {index} (tokens {start}..{start + step - 1}): "
                                 f"{problem}", key)


def chunk_problem(array: zarr.Array, name: str, axis: int, start: int, stop: int) -> str | None:
    """What is wrong with tokens ``start:stop`` of ``array`` (decoded through its checksums), or None."""
    region = [slice(None)] * array.ndim
    region[axis] = slice(start, stop)
    try:
        block = layered_block(array, tuple(region))  # a 2.0 shard's layers in one read (see store.shard_read)
        values = array[tuple(region)] if block is None else block
    except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt chunk to report
        return f"{type(exc).__name__}: {shorten(str(exc))}"
    if values.dtype.kind in "fu" and name != "next_logprob" and not all_finite(values, holds_bits(array)):
        return "non-finite values"
    return None


def all_finite(values: np.ndarray, bits: bool) -> bool:
    """Whether every value is finite: bf16 (as bit patterns) and float16 by their exponent bits (all ones: inf or
    NaN), without widening; other floats by value; integers always."""
    if bits:
        return not ((values & 0x7F80) == 0x7F80).any()
    if values.dtype == np.float16:
        return not ((values.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return values.dtype.kind != "f" or bool(np.isfinite(values).all())


def shard_index_problems(array: zarr.Array, name: str, tokens: int, problems: Problems) -> set[str]:
    """2.0: read every committed shard's index and check it (its crc32c; entries inside the shard, no longer than an
    inner chunk of the array, not overlapping) and that every inner chunk holding committed tokens is in it (a
    missing one would read as zeros); returns the keys of the shards at fault."""
    bad = set()
    axis = array.metadata.dimension_names.index("token")
    codec = array.metadata.codecs[0]
    per_shard = tuple(s // c for s, c in zip(array.shards, array.chunks))
    limit = max_object_bytes(math.prod(array.chunks) * array.dtype.itemsize)
    shard_tokens, inner_tokens = array.shards[axis], array.chunks[axis]
    for index, start in enumerate(range(0, tokens, shard_tokens)):
        coords = tuple(index if i == axis else 0 for i in range(array.ndim))
        key = chunk_key(name, coords)
        try:
            found = sync(codec._load_shard_index_maybe(array.store_path / key.split("/", 1)[1], per_shard))
        except Exception as exc:  # noqa: BLE001 - any failure of untrusted index bytes is a problem to report
            problems.add(f"array {name!r} shard {key}: {type(exc).__name__}: {shorten(str(exc))}", key)
            bad.add(key)
            continue
        problems.count_read("shard indexes (crc32c)")
        entries = found.offsets_and_lengths if found is not None else None
        problem = "missing" if entries is None else index_entries_problem(entries, limit)
        if problem is None:
            past = entry_past(entries, sync(array.store_path.store.getsize(f"{array.path}/{key.split('/', 1)[1]}"))
                              - 16 * math.prod(per_shard) - 4)
            problem = None if past is None else f"the index places inner chunk {past} past the end of the shard"
        if problem is None:
            committed = -(-(min(tokens, start + shard_tokens) - start) // inner_tokens)
            held = entries[..., 0] != MAX_UINT_64
            absent = np.argwhere(~np.take(held, range(committed), axis=axis))
            problem = (f"inner chunk {tuple(int(c) for c in absent[0])} of committed tokens is missing from its "
                       "index (it would read as zeros)") if absent.size else None
        if problem:
            problems.add(f"array {name!r} shard {key}: {problem}", key)
            bad.add(key)
    return bad


def chunk_problems(group: zarr.Group, names: list[str], tokens: int) -> list[str]:
    """Read every committed chunk of the named arrays; report those whose bytes fail to decode or checksum."""
    problems = Problems()
    read_chunk_problems(open_arrays(group), names, tokens, problems)
    return problems.report()


def result_groups(analyses: zarr.Group) -> Iterator[tuple[str, zarr.Group]]:
    """Every cached result under ``analyses/`` with its path: ``NAME/KEY`` (one per parameter set), or ``NAME`` for
    a result of the old layout (one dataset directly under the analysis's group)."""
    for name in sorted(analyses.group_keys()):
        group = analyses[name]
        if any(True for _ in group.array_keys()):
            yield name, group
        for key in sorted(group.group_keys()):
            yield f"{name}/{key}", group[key]


def analyses_problems(analyses: zarr.Group, attrs: dict[str, Any], problems: Problems, read: bool) -> None:
    """Cached analysis results: every array checksummed (schema >= 1.3; older results get a note), at most
    MAX_RESULT_BYTES per result, and with ``read`` every chunk decoded (crc32c checked)."""
    current = version_tuple(str(attrs["schema_version"])) >= CHECKSUMMED_HEAD
    try:
        groups = list(result_groups(analyses))
    except Exception as exc:  # noqa: BLE001 - untrusted metadata may break zarr's parser in any way
        problems.add(f"{ANALYSES}/ is unreadable ({type(exc).__name__}: {shorten(str(exc))}): clear it with "
                     "depthcache analyze NAME STORE --clear")
        return
    for path, group in groups:
        name = path.split("/")[0]
        redo = f"recompute it with depthcache analyze {name} STORE --force"
        try:
            arrays = dict(group.arrays())
            size = sum(a.nbytes for a in arrays.values())
            unchecked = sorted(n for n, a in arrays.items() if not is_checksummed(a.metadata.to_dict()["codecs"]))
        except Exception as exc:  # noqa: BLE001 - untrusted metadata may break zarr's parser in any way
            problems.add(f"{ANALYSES}/{path} is unreadable ({type(exc).__name__}: {shorten(str(exc))}): {redo}")
            continue
        if size > MAX_RESULT_BYTES:
            problems.add(f"{ANALYSES}/{path} declares {size:,} bytes, more than a cached result may take "
                         f"({MAX_RESULT_BYTES:,}): {redo}")
            continue
        result_chunk_problems(f"{ANALYSES}/{path}", group, problems, redo)
        if unchecked and current:
            problems.add(f"{ANALYSES}/{path}: {', '.join(unchecked)} not checksummed: {redo}")
        elif unchecked:
            problems.note(UNCHECKSUMMED_RESULTS_NOTE)
        if read:
            read_result_problems(path, arrays, problems, "cached analysis arrays (crc32c)" if not unchecked
                                 else "cached analysis arrays (no checksum)")


def read_result_problems(path: str, arrays: Mapping[str, zarr.Array], problems: Problems, label: str) -> None:
    """Decode every array of one cached result (crc32c checked where present)."""
    name = path.split("/")[0]
    for array_name, array in arrays.items():
        try:
            array[...]
        except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt result to report
            where = f"{ANALYSES}/{path}/{array_name}"
            problems.add(f"{where}: {type(exc).__name__}: {shorten(str(exc))}: recompute it with depthcache analyze "
                         f"{name} STORE --force")
            keys = (chunk_key(where, c) for c in grid_coords(tuple(array.cdata_shape)))
            problems.keys.update(itertools.islice(keys, MAX_KEYS))
            continue
        problems.count_read(label)


def group_problems(group: zarr.Group, objects: Mapping[str, int], problems: Problems, read: bool,
                   prefix: str = "") -> None:
    """Problems of one store or run group (lines prefixed with ``prefix``, e.g. 'runs/skip_3: ')."""
    found = Problems()
    try:
        attrs = read_attrs(group)
        check_json_depth(attrs, f"attributes.{ATTRS_KEY}")
    except DepthcacheError as exc:
        found.add(str(exc))
    else:
        for line in attr_problems(attrs) or limit_problems(attrs):
            found.add(line)
        if not found:
            store_problems(group, attrs, objects, found, read)
    merge(problems, found, prefix)


def merge(into: Problems, found: Problems, prefix: str) -> None:
    """Add a sub-check's problems, notes and counts to ``into`` (keys and lines prefixed)."""
    for line in found.lines:
        into.add(prefix + line)
    into.count += found.count - len(found.lines)
    into.keys |= {f"{prefix.removesuffix(': ')}/{k}" if prefix else k for k in found.keys}
    for note in found.notes:
        into.note(note)
    for what, n in found.read.items():
        into.count_read(what, n)


def validate(location: str, read_chunks: bool = True, storage_options: Mapping[str, Any] | None = None
             ) -> Problems:
    """Every problem of a store and its runs (schema, limits, shapes, missing or oversized objects, model head,
    cached analyses, and with ``read_chunks`` every checksum), what was read, and notes."""
    group = open_group(location, "r", storage_options=storage_options)
    problems = Problems()
    with unreadable_metadata_as_error(group):
        objects = object_listing(group)
        leftover_problems(objects, problems)
        group_problems(group, objects, problems, read_chunks)
        runs = sorted(group["runs"].group_keys()) if not problems and "runs" in group.group_keys() else []
        for name in runs:
            prefix = f"runs/{name}/"
            inside = {k.removeprefix(prefix): v for k, v in objects.items() if k.startswith(prefix)}
            group_problems(group[f"runs/{name}"], inside, problems, read_chunks, f"runs/{name}: ")
    return problems


def verified(problems: Problems) -> str:
    """What a full validation decoded and checked, in words ('2 model head arrays (crc32c), ...')."""
    parts = [f"{n:,} {what}" for what, n in problems.read.items()]
    return ", ".join(parts) if parts else "no chunk committed yet"


def validate_store(location: str, read_chunks: bool = True,
                   storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """All problems found in a store and its runs, as lines (at most MAX_REPORTED_PROBLEMS, then a count)."""
    return validate(location, read_chunks, storage_options).report()


@contextmanager
def unreadable_metadata_as_error(group: zarr.Group) -> Iterator[None]:
    """A member's zarr.json that zarr cannot parse (bad JSON, unknown type, wrong fields, nested beyond the parser)
    as a DepthcacheError."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError,
            zarr.errors.NodeTypeValidationError) as exc:
        raise DepthcacheError(f"store {group.store} has unreadable array metadata "
                              f"({type(exc).__name__}: {shorten(str(exc))}); it is damaged or not a depthcache "
                              "store") from exc
