"""Validation of a store against the store-format contract: JSON Schema of the attributes, shapes, checksums."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import zarr

from depthcache.errors import DepthcacheError
from depthcache.store import ATTRS_KEY, SITE_ARRAYS, TOKEN_ARRAYS, read_attrs

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


@cache
def load_schema(name: str = "store.schema.json") -> dict[str, Any]:
    """A JSON Schema from the repository's language-neutral ``schemas/`` folder."""
    return json.loads((SCHEMA_DIR / name).read_text())


def attr_problems(attrs: Any) -> list[str]:
    """Every way ``attrs`` breaks the store schema, as 'path: message' lines (empty when valid)."""
    validator = jsonschema.Draft202012Validator(load_schema())
    return [f"attributes.{ATTRS_KEY}.{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(attrs), key=lambda e: list(map(str, e.absolute_path)))]


def check_attrs(attrs: Any) -> dict[str, Any]:
    """Return ``attrs`` if valid, else raise a DepthcacheError listing the problems."""
    problems = attr_problems(attrs)
    if problems:
        raise DepthcacheError("store attributes do not match the depthcache schema:\n  " + "\n  ".join(problems[:10]))
    return attrs


def expected_shapes(attrs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shape of every array the attributes promise."""
    n = attrs["layout"]["n_tokens"]
    d = attrs["model"]["d_model"]
    n_layers = len(attrs["options"]["layers"])
    shapes: dict[str, tuple[int, ...]] = {name: (n,) for name in TOKEN_ARRAYS}
    shapes |= {"topk_ids": (n, attrs["options"]["top_k"]), "topk_logprobs": (n, attrs["options"]["top_k"])}
    for site in attrs["options"]["sites"]:
        for name in SITE_ARRAYS[site]:
            shapes[name] = (n, d) if name == "resid_final" else (n_layers, n, d)
    return shapes


def shape_problems(group: zarr.Group, attrs: dict[str, Any]) -> list[str]:
    """Arrays missing or shaped unlike the attributes say."""
    present = dict(group.arrays())
    problems = []
    for name, shape in expected_shapes(attrs).items():
        if name not in present:
            problems.append(f"array {name!r} is missing")
        elif tuple(present[name].shape) != shape:
            problems.append(f"array {name!r} has shape {tuple(present[name].shape)}, expected {shape}")
    return problems


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


def validate_store(location: str, read_chunks: bool = True) -> list[str]:
    """All problems found in a store: schema, shapes, and (optionally) every chunk's checksum."""
    group = zarr.open_group(str(location), mode="r")
    attrs = read_attrs(group)
    problems = attr_problems(attrs)
    if problems:
        return problems
    problems = shape_problems(group, attrs)
    if read_chunks and not problems:
        names = [n for n in expected_shapes(attrs)]
        problems += chunk_problems(group, names, attrs["progress"]["tokens_committed"])
    return problems
