"""Atomic, checked input/output of a store: opening groups (local or fsspec URL), attributes, result datasets."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from depthcache.errors import DepthcacheError
from depthcache.store.layout import ATTRS_KEY, SCHEMA_VERSION


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs such as ``s3://bucket/run.zarr``."""
    return "://" in str(location)



def open_group(location: str | os.PathLike[str], mode: str = "r", path: str | None = None,
               storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open a store (local path or URL) or one of its subgroups, with a clear error when absent."""
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options and is_url(location):
        kwargs["storage_options"] = dict(storage_options)
    if path:
        kwargs["path"] = path
    try:
        return zarr.open_group(str(location), **kwargs)
    except FileNotFoundError as exc:
        raise DepthcacheError(f"no depthcache store at {location}{'/' + path if path else ''}") from exc
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise DepthcacheError(f"{location} is not a Zarr v3 store ({exc})") from exc
    except (ValueError, TypeError, KeyError) as exc:  # malformed zarr.json of an untrusted store
        raise DepthcacheError(f"{location}: unreadable zarr metadata ({type(exc).__name__}: {exc})") from exc



def local_name(location: str | os.PathLike[str]) -> Path:
    """A local path to name things after a store: the store itself, or its last URL component in the cwd."""
    text = str(location).rstrip("/")
    return Path.cwd() / text.rsplit("/", 1)[-1] if is_url(text) else Path(text)



def model_display_name(model: dict[str, Any]) -> str:
    """The exact name of a store's model for figures and summaries, e.g. 'SmolLM2-135M-Instruct (Q4_1 GGUF,
    dequantized)'; stores made before names were recorded fall back to their alias or spec."""
    if isinstance(model.get("display_name"), str) and model["display_name"]:
        return model["display_name"]
    name = model.get("alias") or str(model.get("spec", "?")).rstrip("/").rsplit("/", 1)[-1]
    return f"{name} (GGUF, dequantized)" if model.get("source") == "gguf" else name


def read_attrs(group: zarr.Group) -> dict[str, Any]:
    """The depthcache attributes of a store or run group, refusing stores that are not ours or too new."""
    attrs = group.attrs.asdict().get(ATTRS_KEY)
    if not isinstance(attrs, dict):
        raise DepthcacheError(f"{group.store} has no '{ATTRS_KEY}' attributes: not a depthcache store")
    version = str(attrs.get("schema_version", ""))
    if major(version) != major(SCHEMA_VERSION) or version_tuple(version) > version_tuple(SCHEMA_VERSION):
        raise DepthcacheError(
            f"store schema version {version!r} is newer than this depthcache understands "
            f"({SCHEMA_VERSION}); upgrade depthcache to read it")
    return attrs



def major(version: str) -> str:
    """Major part of a 'MAJOR.MINOR' schema version."""
    return version.split(".")[0]



def version_tuple(version: str) -> tuple[int, ...]:
    """'1.2' → (1, 2); malformed versions sort as newest so they are refused."""
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (10**9,)



def local_root(group: zarr.Group) -> Path | None:
    """Filesystem folder of a group on a LocalStore (None for remote stores)."""
    root = getattr(group.store, "root", None)
    if root is None or not isinstance(group.store, zarr.storage.LocalStore):
        return None
    return Path(root) / group.path if group.path else Path(root)



def fsync_path(path: Path) -> None:
    """Force a file's bytes, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def can_write(folder: str | os.PathLike[str]) -> bool:
    """True if a file can be created in the existing local ``folder``."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def require_writable(path: Path, option: str = "--out") -> Path:
    """The nearest existing folder above ``path``, checked writable (one clear error naming ``option`` if not)."""
    parent = Path(path).resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise DepthcacheError(f"cannot write to {existing} ({exc.strerror}): choose a writable {option}") from exc
    return existing


def replace_atomically(staged: Path, dest: Path) -> None:
    """Move a fully written file or folder into place in one rename, then make the rename durable."""
    os.replace(staged, dest)
    fsync_path(Path(dest).parent)


def write_attrs(group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Replace the depthcache attributes atomically (temp file + rename + fsync on local stores)."""
    folder = local_root(group)
    if folder is None:
        group.attrs.update({ATTRS_KEY: attrs})
        return
    meta_path = folder / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("attributes", {})[ATTRS_KEY] = attrs
    tmp = meta_path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    replace_atomically(tmp, meta_path)



def string_encoding(ds: xr.Dataset) -> dict[str, dict]:
    """Store text variables as variable-length strings: numpy's fixed-width or StringDType text (pandas 3 string
    indexes) would become Zarr's fixed-length UTF-32, a data type without a Zarr v3 specification."""
    return {name: {"dtype": object} for name, var in ds.variables.items() if var.dtype.kind in "UT"}



def write_dataset_atomically(ds: xr.Dataset, folder: Path) -> None:
    """Write ``ds`` as a Zarr v3 group at ``folder`` via a hidden sibling renamed into place: never partial."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.writing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds.to_zarr(str(tmp), mode="w", zarr_format=3, consolidated=False, encoding=string_encoding(ds))
        shutil.rmtree(folder, ignore_errors=True)
        replace_atomically(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def _json_default(value: Any) -> Any:
    """Make numpy scalars in attributes JSON-serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
