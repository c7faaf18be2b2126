"""Atomic, checked input/output of a store: opening groups (local or fsspec URL), attributes, result datasets."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
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
    os.replace(tmp, meta_path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)



def string_encoding(ds: xr.Dataset) -> dict[str, dict]:
    """Store text variables as variable-length strings: numpy's fixed-width or StringDType text (pandas 3 string
    indexes) would become Zarr's fixed-length UTF-32, a data type without a Zarr v3 specification."""
    return {name: {"dtype": object} for name, var in ds.variables.items() if var.dtype.kind in "UT"}



RENAMED_DIMS_ATTR = "depthcache_renamed_dims"
RESULT_DIM_PREFIX = "result_"


def with_private_dims(ds: xr.Dataset, taken: Iterable[str]) -> xr.Dataset:
    """``ds`` with each dimension named in ``taken`` renamed ``result_<dim>`` (recorded in an attribute): a result
    stored inside a store must not reuse the store's own dimension names with other sizes, or generic readers such
    as ``xr.open_datatree`` refuse the whole tree (schema 1.3)."""
    renames = {dim: RESULT_DIM_PREFIX + str(dim) for dim in ds.dims if dim in set(taken)}
    if not renames:
        return ds
    out = ds.rename(renames)
    out.attrs[RENAMED_DIMS_ATTR] = json.dumps({new: old for old, new in renames.items()})
    return out


def open_result(location: Any, group: str | None = None, **kwargs: Any) -> xr.Dataset:
    """A result dataset written by ``write_dataset_atomically``, with its dimensions under their own names again."""
    ds = xr.open_zarr(location, group=group, consolidated=False, **kwargs)
    renamed = ds.attrs.pop(RENAMED_DIMS_ATTR, None)
    if renamed is None:
        return ds
    try:
        names = {new: old for new, old in json.loads(renamed).items() if new in ds.dims or new in ds.variables}
    except (ValueError, AttributeError) as exc:
        raise DepthcacheError(f"result {location}{'/' + group if group else ''} has a malformed "
                              f"{RENAMED_DIMS_ATTR} attribute") from exc
    return ds.rename(names)


def write_dataset_atomically(ds: xr.Dataset, folder: Path, avoid_dims: Iterable[str] = ()) -> None:
    """Write ``ds`` as a Zarr v3 group at ``folder`` via a hidden sibling renamed into place: never partial;
    dimensions named in ``avoid_dims`` are stored under private names (read back by ``open_result``)."""
    ds = with_private_dims(ds, avoid_dims)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.writing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds.to_zarr(str(tmp), mode="w", zarr_format=3, consolidated=False, encoding=string_encoding(ds))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def _json_default(value: Any) -> Any:
    """Make numpy scalars in attributes JSON-serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
