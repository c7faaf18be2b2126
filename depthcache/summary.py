"""Human summary of a store (``depthcache info``): what was extracted, how much, and what it costs on disk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr

from depthcache.store import results
from depthcache.store.io import model_display_name
from depthcache.store.reader import Store


def layer_ranges(layers: list[int]) -> str:
    """[0,1,2,5,7,8] → '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def disk_bytes(location: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Bytes the store's files take (local folders and fsspec URLs)."""
    if "://" in location:
        import fsspec

        fs, path = fsspec.core.url_to_fs(location, **dict(storage_options or {}))
        return int(fs.du(path))
    return sum(f.stat().st_size for f in Path(location).rglob("*") if f.is_file())


def raw_bytes(group: zarr.Group, committed: int, total: int) -> int:
    """Uncompressed bytes of the committed part of the root arrays."""
    return sum(int(a.nbytes * committed / max(total, 1)) for _, a in group.arrays() if "token" in
               (a.metadata.dimension_names or ()))


def quantization_line(quantization: dict[str, Any] | None) -> str:
    """'; Q4_1 GGUF SmolLM2-135M-Instruct.Q4_1.gguf (tensors F32 61, Q4_1 210), dequantized to float32' or ''."""
    if not isinstance(quantization, dict):
        return ""
    tensors = ", ".join(f"{kind} {count}" for kind, count in (quantization.get("tensor_types") or {}).items())
    return (f"\n           {quantization.get('type')} {str(quantization.get('format', '')).upper()} "
            f"{quantization.get('source_file')} (tensors {tensors or 'n/a'}), "
            f"dequantized to {quantization.get('dequantized_to')}")


def summary(location: str, storage_options: Mapping[str, Any] | None = None, results_dir: str | None = None) -> str:
    """Multi-line description of a store (checked like every store read: schema, limits, array metadata) and of
    its cached analysis results (in the store, or in ``results_dir``)."""
    store = Store(location, dict(storage_options or {}))
    group, a = store.group, store.attrs
    m, o, p, lay = a["model"], a["options"], a["progress"], a["layout"]
    on_disk = disk_bytes(os.fspath(location), storage_options)
    raw = raw_bytes(group, p["tokens_committed"], lay["n_tokens"])
    runs = store.runs()
    cached = results.all_entries(store, results_dir)
    weights = (m.get("weights_sha256") or "")[:12] or "n/a"
    lines = [
        f"store      {location}  (schema {a['schema_version']}, created {a['created']})",
        f"model      {model_display_name(m)}",
        f"weights    {m['spec']}  ({m['architecture']}, from {m['source']}, sha256 {weights}…)"
        f"{quantization_line(m.get('quantization'))}",
        f"layers     {len(o['layers'])} of {m['n_layers']} stored ({layer_ranges(o['layers'])}), d_model {m['d_model']}",
        f"sites      {', '.join(o['sites'])}   dtype {o['dtype']}   top-k {o['top_k']}",
        f"tokens     {p['tokens_committed']:,} of {lay['n_tokens']:,} committed"
        f"{' (complete)' if p['complete'] else ' (incomplete: resume with --resume)'}; "
        f"{lay['n_windows']} windows of ≤{o['seq_len']} tokens",
        f"layout     {layout_line(a)}",
        f"dataset    {a['dataset']['spec']}  ({a['dataset']['n_documents']} documents, sha256 "
        f"{a['dataset']['sha256'][:12]}…)",
        f"size       {on_disk / 2**20:,.1f} MiB on disk; activations {raw / 2**20:,.1f} MiB raw "
        f"(compression ×{raw / max(on_disk, 1):.2f} overall)",
        f"runs       {', '.join(runs) or '(none)'}",
        f"analyses   {len(cached)} cached" + (":" if cached else " (depthcache analyze NAME STORE computes one)"),
        *entry_lines(cached, store),
    ]
    depth = effective_depth_line(store, results_dir) if cached else None
    return "\n".join(lines + ([f"depth use  {depth}"] if depth else []))


def layout_line(attrs: dict) -> str:
    """How the activations are cut into objects: 2.0 shards (all layers of a token range, one inner chunk per
    layer, and the longer shards of the arrays without a layer) with their sizes, or 1.x chunks."""
    lay, o, m = attrs["layout"], attrs["options"], attrs["model"]
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[o["dtype"]]
    layer_chunk = lay["chunk_tokens"] * m["d_model"] * itemsize
    objects = -(-lay["n_tokens"] // lay["chunk_tokens"])
    if "token_shard_tokens" not in lay:
        return (f"schema 1.x chunks of {lay['chunk_tokens']:,} tokens × all layers "
                f"({layer_chunk * len(o['layers']) / 2**20:,.1f} MiB), {objects:,} per array; reading one layer "
                "reads them all (depthcache upgrade rewrites it as 2.0)")
    token_shard = lay["token_shard_tokens"]
    return (f"shards of {lay['chunk_tokens']:,} tokens × {len(o['layers'])} layers "
            f"({layer_chunk * len(o['layers']) / 2**20:,.1f} MiB, {objects:,} per array), one inner chunk per layer "
            f"({layer_chunk / 2**20:,.2f} MiB); resid_final and token arrays in shards of {token_shard:,} tokens "
            f"({token_shard * m['d_model'] * itemsize / 2**20:,.1f} MiB, {-(-lay['n_tokens'] // token_shard):,} "
            "per array)")


def entry_lines(entries: list[results.Entry], store: Store) -> list[str]:
    """One line per cached result: analysis, parameters, and whether it is still current for this store."""
    width = max((len(e.name) for e in entries), default=0)
    return [f"  {e.name:<{width}}  {results.params_text(e.params) if not e.old else '(old format)'}{status(e, store)}"
            for e in entries]


def status(entry: results.Entry, store: Store) -> str:
    """'' for a current result of this store, else why it will be recomputed (or which other stores it used)."""
    sources = entry.meta.get("source_locations")
    if isinstance(sources, list) and len(sources) > 1:
        return f"  (from {', '.join(map(str, sources))})"
    return "" if results.current(entry, [store]) else "  (stale: recomputed on next use)"


def effective_depth_line(store: Store, results_dir: str | None = None) -> str | None:
    """The effective-depth cutoffs when they (or the contributions and logit-lens results) are cached."""
    from depthcache.analyze.effective_depth import info_line

    return info_line(store, results_dir)
