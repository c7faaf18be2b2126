"""Atomic, checked input/output of a store: opening groups (local or fsspec URL), attributes, result datasets."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

if TYPE_CHECKING:  # only annotations: writing a store (extract) never imports xarray
    import xarray as xr

from depthcache.errors import CorruptData, DepthcacheError
from depthcache.limits import MAX_JSON_DEPTH, MAX_METADATA_BYTES
from depthcache.store.layout import ATTRS_KEY, NEWEST_READABLE, SCHEMA_VERSION
from depthcache.store.shard_read import layered_block

METADATA = "zarr.json"
NOT_A_FILE = -1  # size given by object_listing to anything that is not a regular file (device, pipe, socket)


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs such as ``s3://bucket/run.zarr``."""
    return "://" in str(location)



def open_group(location: str | os.PathLike[str], mode: str = "r", path: str | None = None,
               storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open a store (local path or URL) or one of its subgroups, with a clear error when absent; its zarr.json is
    checked to be a regular file of at most MAX_METADATA_BYTES before zarr parses it."""
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options and is_url(location):
        kwargs["storage_options"] = dict(storage_options)
    if path:
        kwargs["path"] = path
    try:
        check_metadata_file(location, path, storage_options)
        return zarr.open_group(str(location), **kwargs)
    except FileNotFoundError as exc:
        raise DepthcacheError(f"no depthcache store at {location}{'/' + path if path else ''}") from exc
    except PermissionError as exc:
        if is_url(location):
            raise access_error(location, exc) from exc
        raise DepthcacheError(f"cannot open {location}: permission denied ({exc.filename})") from exc
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise DepthcacheError(f"{location} is not a Zarr v3 store ({exc})") from exc
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # malformed zarr.json of an untrusted store
        raise DepthcacheError(f"{location}: unreadable zarr metadata ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from exc
    except Exception as exc:
        if not is_access_failure(exc):
            raise
        raise access_error(location, exc) from exc


@contextmanager
def reaching(location: str | os.PathLike[str]) -> Iterator[None]:
    """Inside the body, a failure to reach or read ``location`` becomes one line (``access_error``)."""
    try:
        yield
    except Exception as exc:
        if not is_access_failure(exc):
            raise
        raise access_error(location, exc) from exc


NETWORK_LIBRARIES = frozenset({"aiobotocore", "aiohttp", "botocore", "s3fs", "gcsfs", "adlfs", "azure", "google",
                               "requests", "urllib3"})


def is_access_failure(exc: BaseException) -> bool:
    """True for a failure to reach or read a location rather than a bug: any OSError (a symlink loop, an I/O error,
    a refused connection, a timeout) or an error of the libraries fsspec reaches object stores with."""
    return isinstance(exc, OSError) or any(t.__module__.split(".")[0] in NETWORK_LIBRARIES for t in type(exc).__mro__)


def access_error(location: str | os.PathLike[str], exc: BaseException) -> DepthcacheError:
    """One line naming ``location`` and why it cannot be reached or read (connection refused, unknown host, timeout,
    access denied, a symlink loop), with what to check."""
    if not is_url(location):
        return DepthcacheError(f"cannot use {location}: {getattr(exc, 'strerror', None) or one_line(exc)}")
    return DepthcacheError(f"cannot reach {location}: {one_line(exc)}; check the URL, the network, the credentials "
                           "(AWS_* variables) and --storage-option endpoint_url=...")


def one_line(exc: BaseException) -> str:
    """'TYPE: message (underlying error)' on one line, e.g. 'EndpointConnectionError: Could not connect to the
    endpoint URL: "http://127.0.0.1:9/b/x.zarr/zarr.json" (Cannot connect to host 127.0.0.1:9 [Connect call
    failed])'."""
    text = " ".join(str(exc).split())[:300] or "no message"
    inner = getattr(exc, "kwargs", {}).get("error") or exc.__cause__  # botocore keeps the socket's error in kwargs
    detail = " ".join(str(inner).split())[:200] if inner is not None else ""
    return f"{type(exc).__name__}: {text}" + (f" ({detail})" if detail and detail not in text else "")


def read_block(array: zarr.Array, key: Any) -> np.ndarray:
    """``array[key]``, one block of a store array as dask reads it; bytes that fail to decode or their checksum raise
    CorruptData naming the store, the array and the token chunk, as the command line does."""
    try:
        block = layered_block(array, key)  # a 2.0 block: one ranged read per shard (see store.shard_read)
        return array[key] if block is None else block
    except (ValueError, RuntimeError) as exc:
        dims = list(array.metadata.dimension_names or ())
        tokens = key[dims.index("token")] if "token" in dims and isinstance(key, tuple) else None
        chunk = (f" token chunk {tokens.start // array.chunks[dims.index('token')]} (tokens {tokens.start}.."
                 f"{tokens.stop - 1})" if isinstance(tokens, slice) and tokens.start is not None else "")
        raise CorruptData(f"corrupt data: {str(array.store).removeprefix('file://')}: array {array.path!r}{chunk}: "
                          f"{type(exc).__name__}: {str(exc)[:200]}. Re-extract or copy the store again (depthcache "
                          "validate STORE lists every bad chunk)") from exc


def check_metadata_file(location: str | os.PathLike[str], path: str | None,
                        storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse a group's zarr.json that is not a regular file or is larger than MAX_METADATA_BYTES (absent is fine:
    opening reports it)."""
    where = f"{str(location).rstrip('/')}/{path + '/' if path else ''}{METADATA}"
    if is_url(location):
        import fsspec

        fs, key = fsspec.core.url_to_fs(where, **dict(storage_options or {}))
        try:
            size = int(fs.info(key).get("size") or 0)
        except FileNotFoundError:
            return
    else:
        try:
            info = os.stat(where)
        except (FileNotFoundError, NotADirectoryError):
            return
        size = info.st_size if stat.S_ISREG(info.st_mode) else NOT_A_FILE
    if size == NOT_A_FILE:
        raise DepthcacheError(f"{where} is not a regular file: not a depthcache store")
    if size > MAX_METADATA_BYTES:
        raise DepthcacheError(f"{where} is {size:,} bytes, more than the {MAX_METADATA_BYTES:,} a store's metadata "
                              "may take: damaged or not a depthcache store")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json_depth(value: Any, what: str) -> Any:
    """``value`` if nested at most MAX_JSON_DEPTH deep, else a DepthcacheError naming ``what``."""
    if json_depth(value) > MAX_JSON_DEPTH:
        raise DepthcacheError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep: damaged or not written "
                              "by depthcache")
    return value


def parse_json(text: str | bytes, what: str) -> Any:
    """JSON taken from a store (untrusted): at most MAX_METADATA_BYTES, at most MAX_JSON_DEPTH deep."""
    if len(text) > MAX_METADATA_BYTES:
        raise DepthcacheError(f"{what} is {len(text):,} bytes, more than {MAX_METADATA_BYTES:,}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DepthcacheError(f"{what} is not valid JSON ({type(exc).__name__})") from exc
    return check_json_depth(value, what)


def object_listing(group: zarr.Group) -> dict[str, int]:
    """Every object under a group, listed once: key relative to the group → size in bytes (NOT_A_FILE for a
    device, pipe or socket, which must never be read)."""
    root = local_root(group)
    if root is not None:
        return local_listing(root)
    fs = getattr(group.store, "fs", None)
    if fs is not None:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()  # remote listings may be cached from before a copy
        base = "/".join(p for p in (group.store.path.rstrip("/"), group.path) if p)
        found = sync(fs._find(base, detail=True)) if getattr(fs, "async_impl", False) else fs.find(base, detail=True)
        prefix = base + "/"
        return {path.removeprefix(prefix): int(info.get("size") or 0) for path, info in found.items()
                if path.startswith(prefix) and info.get("type", "file") == "file"}
    prefix = f"{group.path}/" if group.path else ""
    return {key.removeprefix(prefix): sync(group.store.getsize(key)) for key in sync(_keys(group.store, prefix))}


def local_listing(root: Path) -> dict[str, int]:
    """Files under a local folder, relative '/'-separated key → size (NOT_A_FILE for non-regular files)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                info = os.stat(path)
            except OSError:  # vanished, or a dangling link: absent
                continue
            key = os.path.relpath(path, root).replace(os.sep, "/")
            found[key] = info.st_size if stat.S_ISREG(info.st_mode) else NOT_A_FILE
    return found


async def _keys(store: Any, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]



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
    """The depthcache attributes of a store or run group, refusing stores that are not ours, too new or nested
    deeper than any real store (before anything recursive touches them)."""
    attrs = group.attrs.asdict().get(ATTRS_KEY)
    if not isinstance(attrs, dict):
        raise DepthcacheError(f"{group.store} has no '{ATTRS_KEY}' attributes: not a depthcache store")
    check_json_depth(attrs, f"the '{ATTRS_KEY}' attributes of {group.store}")
    version = str(attrs.get("schema_version", ""))
    newest = NEWEST_READABLE.get(major(version))
    if newest is None or version_tuple(version) > version_tuple(newest):
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
    parent = resolved(path, option).parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise DepthcacheError(f"cannot write to {existing} ({exc.strerror}): choose a writable {option}") from exc
    return existing


def resolved(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` made absolute with its links followed; a symlink loop is one error naming ``option``."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: Python before 3.13 on a loop
        raise DepthcacheError(f"cannot use {path} ({exc}): choose another {option}") from exc


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



def checksummed_encoding(ds: xr.Dataset) -> dict[str, dict]:
    """Every variable (coordinates too) compressed with zstd and checksummed with crc32c, text as variable-length
    strings: a cached result is read back only if its bytes are the ones written."""
    strings = string_encoding(ds)
    return {name: {"compressors": [ZstdCodec(level=1), Crc32cCodec()], **strings.get(name, {})}
            for name in ds.variables}


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
    import xarray as xr  # here, not at the top: writing a store (extract) never imports xarray

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


def write_dataset_atomically(ds: xr.Dataset, folder: Path, avoid_dims: Iterable[str] = (),
                             chunks: dict[str, tuple[int, ...]] | None = None) -> None:
    """Write ``ds`` as a checksummed Zarr v3 group at ``folder`` via a hidden sibling renamed into place: never
    partial, and every chunk written, fill values only or not (so an absent chunk always means damage); dimensions
    named in ``avoid_dims`` are stored under private names (read back by ``open_result``); ``chunks`` gives some
    variables their chunk shape (others: one chunk)."""
    ds = with_private_dims(ds, avoid_dims)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers(folder)
    tmp = hidden_sibling(folder, "writing")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        encoding = checksummed_encoding(ds)
        for name, shape in (chunks or {}).items():
            encoding[name]["chunks"] = shape
        ds.to_zarr(str(tmp), mode="w", zarr_format=3, consolidated=False, encoding=encoding, write_empty_chunks=True)
        publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hidden_sibling(folder: Path, role: str) -> Path:
    """``.NAME.ROLE-PID`` beside ``folder``: this process's private folder while writing or replacing it (hidden:
    never taken for a result)."""
    return folder.with_name(f".{folder.name}.{role}-{os.getpid()}")


def remove_dead_writers(folder: Path) -> None:
    """Remove the hidden siblings of ``folder`` left by processes of this machine that died (kill -9) mid-write."""
    for sibling in folder.parent.glob(f".{glob.escape(folder.name)}.*-*"):
        pid = sibling.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """True if a process with this id runs on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staged: Path, folder: Path) -> None:
    """Move a fully written folder to ``folder`` in one rename, the previous one first moved aside whole (never half
    deleted); when a concurrent writer publishes ``folder`` in between, its copy (of the same inputs) is kept and
    ``staged`` dropped by the caller: neither writer fails."""
    old = hidden_sibling(folder, "replaced")
    shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(folder, old)
    except FileNotFoundError:
        pass
    try:
        replace_atomically(staged, folder)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)



def _json_default(value: Any) -> Any:
    """Make numpy scalars in attributes JSON-serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
