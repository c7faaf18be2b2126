"""``depthcache upgrade SOURCE DEST``: a schema 1.x store rewritten as 2.0 (sharded), every checksum verified.

The source is only read: every chunk is decoded through its crc32c (a failing chunk stops the rewrite, naming it),
the activations and per-token arrays are written through the extraction's writer in 2.0 chunks (whole shards, one
inner chunk per layer), the model head, tokenizer files and cached analyses are copied byte for byte, and the new
store is validated (every chunk, index, head and result decoded) before it is moved into place. The attributes keep
the source's provenance (``created`` included, so cached results stay valid: the values are the same); only
``schema_version`` and ``layout`` change. Skip runs are rewritten the same way.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from depthcache.errors import DepthcacheError
from depthcache.extraction.writer import ChunkWriter, along, token_axis
from depthcache.progress import MINUTE, Progress
from depthcache.store.arrays import open_arrays
from depthcache.store.io import hidden_sibling, open_group, read_attrs, replace_atomically, write_attrs
from depthcache.store.layout import (
    DEFAULT_SHARD_MIB,
    MIB,
    SCHEMA_VERSION,
    StoreLayout,
    choose_chunk_tokens,
    choose_token_shard_tokens,
    create_array,
    create_arrays,
)
from depthcache.store.schema import check_store, validate

ITEMSIZES = {"bfloat16": 2, "float16": 2, "float32": 4}
COPIED_AS_IS = ("model", "analyses")  # checksummed (1.3) and validated after the copy


def upgrade_store(source: str, destination: str, shard_mib: int = DEFAULT_SHARD_MIB,
                  progress: bool | None = None) -> dict[str, Any]:
    """Rewrite the complete 1.x store ``source`` as a 2.0 store at ``destination`` (which must not exist);
    returns the new root attributes."""
    src, dst = check_places(source, destination)
    group = open_group(str(src), "r")
    attrs = check_store(group)
    require_upgradable(attrs, source)
    runs = sorted(group["runs"].group_keys()) if "runs" in group else []
    run_attrs = {name: check_store(group["runs"][name]) for name in runs}
    for name, a in run_attrs.items():
        require_upgradable(a, f"{source}/runs/{name}")
    tmp = hidden_sibling(dst, "upgrading")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        new = upgraded_attrs(attrs, attrs, shard_mib)
        tokens = attrs["layout"]["n_tokens"] + sum(a["layout"]["n_tokens"] for a in run_attrs.values())
        with Progress("upgrade", tokens, "tok", progress, every=MINUTE) as bar:
            bar.note(f"{source} (schema {attrs['schema_version']}, {attrs['layout']['chunk_tokens']:,}-token chunks) "
                     f"→ {destination} (schema {SCHEMA_VERSION}, {new['layout']['chunk_tokens']:,}-token shards)")
            rewrite_group(group, zarr.open_group(str(tmp), mode="w", zarr_format=3), attrs, new, bar)
            for folder in COPIED_AS_IS:
                if (src / folder).is_dir():
                    shutil.copytree(src / folder, tmp / folder)
            for name in runs:
                target = zarr.open_group(str(tmp), mode="r+").require_group("runs").create_group(name)
                rewrite_group(group["runs"][name], target, run_attrs[name],
                              upgraded_attrs(run_attrs[name], new, shard_mib), bar)
        found = validate(str(tmp))
        if found:
            raise DepthcacheError(f"the rewritten store failed validation ({found.report()[0]}); nothing was written "
                                  f"to {destination}")
        replace_atomically(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_attrs(open_group(str(dst), "r"))


def check_places(source: str, destination: str) -> tuple[Path, Path]:
    """Both as absolute paths; refuses a URL, a destination that exists or that lies inside the source (or the
    reverse): the source is never overwritten."""
    if "://" in source or "://" in destination:
        raise DepthcacheError("upgrade works on local folders: pull a remote store first (depthcache pull)")
    src, dst = Path(source).resolve(), Path(destination).resolve()
    if not (src / "zarr.json").is_file():
        raise DepthcacheError(f"{source} is not a depthcache store (no zarr.json)")
    if dst == src or src in dst.parents or dst in src.parents:
        raise DepthcacheError(f"{destination} overlaps the source {source}: choose a destination outside it (the "
                              "source is never overwritten)")
    if dst.exists():
        raise DepthcacheError(f"{destination} already exists: choose a new destination")
    if not dst.parent.is_dir():
        raise DepthcacheError(f"{dst.parent} does not exist: create it first")
    return src, dst


def require_upgradable(attrs: dict[str, Any], where: str) -> None:
    """Refuse a store that is already 2.0 or whose extraction has not finished."""
    if "token_shard_tokens" in attrs["layout"]:
        raise DepthcacheError(f"{where} is already sharded (schema {attrs['schema_version']}): nothing to upgrade")
    if not attrs["progress"]["complete"]:
        raise DepthcacheError(f"{where} is not complete ({attrs['progress']['tokens_committed']:,} of "
                              f"{attrs['layout']['n_tokens']:,} tokens): finish it with extract --resume first")


def upgraded_attrs(attrs: dict[str, Any], base: dict[str, Any], shard_mib: int) -> dict[str, Any]:
    """The attributes of the rewritten group: the same, with schema 2.0 and the layout of 2.0 chunks chosen for the
    baseline ``base`` (a run keeps its baseline's chunks, as runs made by extract do)."""
    new = copy.deepcopy(attrs)
    d_model, itemsize = int(attrs["model"]["d_model"]), ITEMSIZES[attrs["options"]["dtype"]]
    n = int(attrs["layout"]["n_tokens"])
    if base is attrs:
        chunk = choose_chunk_tokens(len(attrs["options"]["layers"]), d_model, itemsize, n, shard_mib * MIB)
        shard = choose_token_shard_tokens(chunk, d_model, itemsize, n)
    else:
        chunk = int(base["layout"]["chunk_tokens"])
        shard = min(int(base["layout"]["token_shard_tokens"]), -(-n // chunk) * chunk)
    new["schema_version"] = SCHEMA_VERSION
    new["layout"] |= {"chunk_tokens": chunk, "token_shard_tokens": shard}
    new["progress"] = {"tokens_committed": 0, "complete": False}
    return new


def zstd_level(array: zarr.Array) -> int | None:
    """The zstd level of an activation array's codecs, None when it has no zstd."""
    for codec in array.metadata.to_dict()["codecs"]:
        if isinstance(codec, dict) and codec.get("name") == "zstd":
            return int(codec["configuration"]["level"])
    return None


def rewrite_group(source: zarr.Group, target: zarr.Group, attrs: dict[str, Any], new: dict[str, Any],
                  bar: Progress) -> None:
    """Create ``target``'s 2.0 arrays and copy every token of ``source``'s into them, chunk by chunk (each read
    checks its crc32c), committing progress as extract does."""
    arrays = open_arrays(source)
    lay, opts = new["layout"], new["options"]
    sites = tuple(opts["sites"])
    activation = next((arrays[n] for n in ("resid_pre", "attn_out", "mlp_out") if n in arrays), None)
    layout = StoreLayout(lay["n_tokens"], tuple(opts["layers"]), int(new["model"]["d_model"]), int(opts["top_k"]),
                         sites, opts["dtype"],
                         int(lay["chunk_tokens"]), "task" in new["dataset"],
                         zstd_level(activation) if activation is not None else None, int(lay["token_shard_tokens"]))
    create_arrays(target, layout)
    for name in ("resid_final", "skip_stop"):
        if name in arrays and name not in target:
            create_array(target, name, layout)
    write_attrs(target, new)
    names = sorted(n for n in arrays if n != "layer" and "token" in (arrays[n].metadata.dimension_names or ()))
    n_tokens = int(lay["n_tokens"])

    def commit(stop: int) -> None:
        new["progress"] = {"tokens_committed": stop, "complete": stop == n_tokens}
        write_attrs(target, new)

    writer = ChunkWriter(target, names, int(lay["chunk_tokens"]), n_tokens, 0, commit, threads=2)
    try:
        for start in range(0, n_tokens, int(lay["chunk_tokens"])):
            stop = min(start + int(lay["chunk_tokens"]), n_tokens)
            writer.append({name: read_tokens(arrays[name], name, start, stop) for name in names}, start)
            bar.update(stop - start)
        writer.finish()
    finally:
        writer.close()


def read_tokens(array: zarr.Array, name: str, start: int, stop: int) -> np.ndarray:
    """Tokens ``start:stop`` of a source array (bf16 as bit patterns), each chunk's crc32c checked on the way."""
    try:
        return array[along(token_axis(array), array.ndim, start, stop)]
    except Exception as exc:  # noqa: BLE001 - a chunk that fails to decode or checksum: the source is damaged
        why = "a chunk fails its crc32c" if "checksum" in str(exc) else f"{type(exc).__name__}: {str(exc)[:200]}"
        raise DepthcacheError(f"{name} tokens {start:,}..{stop - 1:,} of the source fail to read ({why}); nothing "
                              "was written: repair the source (depthcache validate lists every bad chunk)") from exc
