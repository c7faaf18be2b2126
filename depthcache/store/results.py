"""Cached analysis results: one entry per analysis and parameter set, beside a store or in a results folder.

Layout (docs/store-format.md, "Cached analysis results"):

    ROOT/<name>/<key>/    one xarray dataset (a Zarr v3 group) per parameter set of analysis <name>;
                          key = the first 16 hex digits of the sha256 of the canonical parameters

ROOT is ``STORE/analyses`` for a writable local store, the ``--results`` folder when one is given, else the local
folder ``<store name>.analyses`` (a URL store is only read). Results pushed with a store (its own ``analyses/``) are
read too. An entry's ``attrs["depthcache_analysis"]`` (JSON) says what it was computed from: ``name``, ``params``
(every parameter, defaults filled in), ``sources`` (the identity of each source store's baseline), ``runs`` (per
source store: the identity of its intervention runs if the analysis looked at them, else null), ``code_version``,
``created`` and ``source_locations``. An entry is used only when all of these match; adding runs to a store
therefore keeps every result that never looked at runs. Results of depthcache 0.1 (one dataset directly under
``analyses/<name>``) are never read: they are listed as old and replaced when the analysis is computed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

import depthcache
from depthcache.errors import DepthcacheError
from depthcache.limits import MAX_RESULT_BYTES
from depthcache.store.complete import missing_chunks
from depthcache.store.io import (
    can_write,
    is_url,
    local_name,
    model_display_name,
    open_result,
    parse_json,
    resolved,
    write_dataset_atomically,
)
from depthcache.store.layout import ROOT_DIMS, is_checksummed
from depthcache.store.reader import Store

RESULT_ATTR = "depthcache_analysis"
KEY_DIGITS = 16
IN_STORE = "analyses"
UNREADABLE = (FileNotFoundError, KeyError, OSError, ValueError, TypeError, AttributeError, RecursionError,
              zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError)


@dataclass(frozen=True)
class Place:
    """A Zarr hierarchy holding cached results under ``prefix`` (local folders can be written, URLs only read)."""

    location: str
    prefix: str = ""
    storage_options: tuple[tuple[str, Any], ...] = ()

    @property
    def writable(self) -> bool:
        """Results are only ever written to local folders."""
        return not is_url(self.location)

    def path(self, *parts: str) -> str:
        """Group path of ``parts`` below the prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    @property
    def options(self) -> dict[str, Any] | None:
        """fsspec options for a URL place (None for a local folder)."""
        return dict(self.storage_options) if self.storage_options and not self.writable else None


@dataclass(frozen=True)
class Entry:
    """One cached result: where it is, its analysis name and key, and its recorded provenance."""

    place: Place
    name: str
    key: str
    meta: dict[str, Any]

    @property
    def old(self) -> bool:
        """A result of the old layout (one dataset directly under ``analyses/<name>``): never read."""
        return self.key == ""

    @property
    def params(self) -> dict[str, Any]:
        """The parameters it was computed with (as recorded)."""
        params = self.meta.get("params")
        return params if isinstance(params, dict) else {}


def canonical(params: dict[str, Any]) -> str:
    """Parameters as sorted JSON: equal parameters, equal string."""
    return json.dumps(params, sort_keys=True, default=str)


def entry_key(params: dict[str, Any]) -> str:
    """The key of an entry: a short hash of its canonical parameters (defaults already filled in)."""
    return hashlib.sha256(canonical(params).encode()).hexdigest()[:KEY_DIGITS]


def params_text(params: dict[str, Any]) -> str:
    """'include_first=false, max_tokens=2048': parameters as the command line takes them (-p KEY=VALUE)."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(params.items())) or "(no parameters)"


def writable_folder(location: str) -> bool:
    """True if files can be created inside a local folder (never for a URL)."""
    return not is_url(location) and can_write(location)


def places(store: Store, results_dir: str | None = None) -> list[Place]:
    """Where ``store``'s results are looked up, the place new results are written first."""
    options = tuple(sorted(store.storage_options.items()))
    inside = Place(store.location, IN_STORE, options)
    if results_dir:
        return [Place(str(results_dir)), inside]
    if writable_folder(store.location):
        return [inside]
    here = Path.cwd() / local_name(store.location).name  # a URL or read-only store's results: ./NAME.analyses/
    return [Place(str(here.with_name(f"{here.name}.analyses"))), inside]


def require_writable_place(store: Store, results_dir: str | None = None, damage: str | None = None) -> None:
    """Refuse, before computing, a place new results cannot be written to (a file in the way, no permission):
    the error says to pass --results, and why the cached result could not be used (``damage``) if one was found."""
    place = places(store, results_dir)[0]
    path = resolved(place.location, "--results FOLDER")
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is None:
        return
    why = f" (the cached result cannot be used: {damage})" if damage else ""
    if not blocker.is_dir():
        raise DepthcacheError(f"cannot save results in {place.location}: {blocker} is in the way (not a folder); "
                              f"pass --results FOLDER{why}")
    if not can_write(blocker):
        raise DepthcacheError(f"cannot save results in {place.location}: {blocker} is not writable; pass --results "
                              f"FOLDER{why}")


def open_place(place: Place, path: str = "") -> zarr.Group | None:
    """A group of a place, read-only, or None when absent or unreadable."""
    try:
        return zarr.open_group(place.location, mode="r", path=place.path(path) or None, zarr_format=3,
                               storage_options=place.options)
    except UNREADABLE:
        return None


def recorded(attrs: Any) -> dict[str, Any] | None:
    """The provenance recorded in a result's attributes, or None when absent or malformed (untrusted input)."""
    try:
        meta = parse_json(attrs.get(RESULT_ATTR, "null"), "a cached result's provenance")
    except (DepthcacheError, TypeError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else None


def entries(place: Place, name: str | None = None) -> list[Entry]:
    """The cached results in a place (of analysis ``name`` only, when given), sorted by name and key."""
    root = open_place(place)
    if root is None:
        return []
    found = []
    try:
        names = sorted(visible(root.group_keys())) if name is None else [name] if name in root.group_keys() else []
        for analysis in names:
            group = root[analysis]
            if (meta := recorded(group.attrs)) is not None:
                found.append(Entry(place, analysis, "", meta))
            for key in sorted(visible(group.group_keys())):
                if (meta := recorded(group[key].attrs)) is not None:
                    found.append(Entry(place, analysis, key, meta))
    except UNREADABLE:
        return found
    return found


def visible(names: Iterable[str]) -> list[str]:
    """Group names that can hold results: hidden ones (``.KEY.writing-PID``, ``.KEY.replaced-PID``) are a writer's
    private folders, complete or not, never results."""
    return [name for name in names if not name.startswith(".")]


def all_entries(store: Store, results_dir: str | None = None) -> list[Entry]:
    """Every cached result of ``store`` in all its places; an entry in an earlier place hides the same key later."""
    seen: set[tuple[str, str]] = set()
    found = []
    for place in places(store, results_dir):
        for entry in entries(place):
            if (entry.name, entry.key) not in seen:
                seen.add((entry.name, entry.key))
                found.append(entry)
    return found


def runs_identity(store: Store) -> str:
    """Hash of the store's intervention runs (names and their attributes): keys results that read runs."""
    group = store.group
    runs = {name: group["runs"][name].attrs.asdict().get("depthcache") for name in store.runs()}
    return hashlib.sha256(json.dumps(runs, sort_keys=True, default=str).encode()).hexdigest()[:KEY_DIGITS]


def provenance(name: str, params: dict[str, Any], stores: Sequence[Store], read_runs: Sequence[bool]
               ) -> dict[str, Any]:
    """What identifies a result computed now: analysis, parameters, source stores (and runs read), code version."""
    return {"name": name, "params": json.loads(canonical(params)), "sources": [s.identity for s in stores],
            "runs": [runs_identity(s) if used else None for s, used in zip(stores, read_runs)],
            "source_locations": [s.location for s in stores],
            "models": [model_display_name(s.attrs["model"]) for s in stores], "code_version": depthcache.__version__}


def current(entry: Entry, stores: Sequence[Store]) -> bool:
    """True if the entry was computed by this code version from exactly these stores (and runs, if it read them)."""
    meta = entry.meta
    if entry.old or meta.get("code_version") != depthcache.__version__ or \
            meta.get("sources") != [s.identity for s in stores]:
        return False
    runs = meta.get("runs")
    if not isinstance(runs, list) or len(runs) != len(stores):
        return False
    return all(r is None or r == runs_identity(s) for r, s in zip(runs, stores))


def belongs(entry: Entry, store: Store) -> bool:
    """True if the entry is a current result of ``store``, alone or as the last of several sources (layer-map's
    deep store)."""
    sources = entry.meta.get("sources")
    if isinstance(sources, list) and len(sources) > 1:
        return not entry.old and sources[-1] == store.identity and \
            entry.meta.get("code_version") == depthcache.__version__
    return current(entry, [store])


def where(entry: Entry) -> str:
    """An entry's location as one string, e.g. 'run.zarr/analyses/contributions/0123456789abcdef'."""
    return f"{entry.place.location.rstrip('/')}/{entry.place.path(entry.name, entry.key)}"


def read(entry: Entry) -> xr.Dataset:
    """An entry's dataset in memory, checked whole: at most MAX_RESULT_BYTES, every array checksummed, every chunk
    present and its checksum verified as it is read; else a DepthcacheError naming what is wrong (stores are
    untrusted: such a result is recomputed, never used)."""
    path = entry.place.path(entry.name, entry.key)
    try:
        ds = open_result(entry.place.location, group=path, storage_options=entry.place.options)
        if ds.nbytes > MAX_RESULT_BYTES:
            raise DepthcacheError(f"{where(entry)} declares {ds.nbytes:,} bytes, more than a cached result may take")
        unchecked = sorted(str(n) for n, v in ds.variables.items() if not is_checksummed(v.encoding.get("compressors")))
        if unchecked:
            raise DepthcacheError(f"{where(entry)}: {', '.join(unchecked)} not checksummed")
        group = open_place(entry.place, f"{entry.name}/{entry.key}")
        missing = missing_chunks(group, 1) if group is not None else ["zarr.json"]
        if missing:
            raise DepthcacheError(f"{where(entry)}/{missing[0]} is missing (the result is incomplete)")
        for name, variable in ds.variables.items():
            try:
                variable.load()
            except (*UNREADABLE, RuntimeError) as exc:
                raise DepthcacheError(f"{where(entry)}/{name} fails to decode or its checksum "
                                      f"({type(exc).__name__}: {str(exc)[:200]})") from exc
        return ds
    except (*UNREADABLE, RuntimeError) as exc:
        raise DepthcacheError(f"{where(entry)} is unreadable ({type(exc).__name__}: {str(exc)[:200]})") from exc


def load(entry: Entry) -> xr.Dataset | None:
    """An entry's dataset in memory, or None when ``read`` finds it damaged."""
    try:
        return read(entry)
    except DepthcacheError:
        return None


def find(name: str, params: dict[str, Any], stores: Sequence[Store], results_dir: str | None = None
         ) -> tuple[xr.Dataset | None, str | None]:
    """The cached result of analysis ``name`` with ``params`` (defaults filled in) on ``stores``, computed by this
    code version from the stores as they are now, or None with why a matching entry could not be used (None if
    there was none)."""
    key = entry_key(json.loads(canonical(params)))
    damage = None
    for place in places(stores[-1], results_dir):
        for entry in entries(place, name):
            if entry.key == key and entry.params == json.loads(canonical(params)) and current(entry, stores):
                try:
                    return read(entry), None
                except DepthcacheError as exc:
                    damage = damage or str(exc)
    return None, damage


def lookup(name: str, params: dict[str, Any], stores: Sequence[Store], results_dir: str | None = None
           ) -> xr.Dataset | None:
    """THE reader of cached results: ``find``'s result, or None."""
    return find(name, params, stores, results_dir)[0]


def save(result: xr.Dataset, meta: dict[str, Any], store: Store, results_dir: str | None = None) -> Path:
    """Write a result with its provenance to the first place of ``store`` (never partial); returns its folder."""
    place = places(store, results_dir)[0]
    name, key = meta["name"], entry_key(meta["params"])
    results = zarr.open_group(place.location, mode="a", zarr_format=3)
    results = results.require_group(place.prefix) if place.prefix else results
    if name in results and recorded(results[name].attrs) is not None:  # old layout: replaced by the new one
        shutil.rmtree(Path(place.location) / place.path(name), ignore_errors=True)  # a concurrent writer may too
    results.require_group(name)
    result.attrs[RESULT_ATTR] = json.dumps(meta)
    folder = Path(place.location) / place.path(name, key)
    write_dataset_atomically(result, folder, avoid_dims=ROOT_DIMS if place.prefix else ())  # inside the store
    return folder


def clear(store: Store, name: str | None = None, params: dict[str, Any] | None = None,
          results_dir: str | None = None) -> list[Entry]:
    """Remove the cached results of ``store`` in its writable places (of ``name``, with ``params`` when given)."""
    key = entry_key(json.loads(canonical(params))) if params is not None else None
    removed = []
    for place in places(store, results_dir):
        if not place.writable or (place.prefix and not writable_folder(place.location)):
            continue
        for entry in entries(place, name):
            if key is None or entry.key == key:
                shutil.rmtree(Path(place.location) / place.path(entry.name, entry.key))  # old: the whole group
                removed.append(entry)
    return removed
