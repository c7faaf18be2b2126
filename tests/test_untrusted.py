"""Untrusted stores: seeded mutations of attributes, array metadata and chunk bytes, decompression bombs, deeply
nested and oversized metadata, and damage to the model head never crash, hang or mislead."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hostile import edit_json, nested_json, plant_bomb
from test_extract import run

from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.store.head import load_tokenizer, read_head

N_MUTATIONS = 30
SECONDS_PER_CALL = 20
ANALYSES = ("residual-norms", "logit-lens")
BAD_VALUES = ["x", [], {}, None, 10**15, -5, 3.5, True]


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when the body runs longer than ``seconds``."""
    def expire(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
        raise TimeoutError(f"command still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: str) -> tuple[int, str]:
    """Run a command in-process under the time limit; any exception other than a clean exit fails the test."""
    with time_limit(SECONDS_PER_CALL):
        result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args[0]} crashed: {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.output


def leaf_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths to every value inside nested dicts (lists count as leaves)."""
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in leaf_paths(v, (*prefix, k))]
    return [prefix]


def random_leaf(attrs: dict, rng: random.Random) -> tuple[dict, tuple]:
    """A random leaf of the depthcache attributes outside the model config: (its parent dict, its path)."""
    path = rng.choice([p for p in leaf_paths(attrs) if p[:2] != ("model", "config")])
    parent = attrs
    for key in path[:-1]:
        parent = parent[key]
    return parent, path


def mutate_attrs(store: Path, rng: random.Random) -> str:
    """Replace or delete one leaf of the root depthcache attributes."""
    def change(meta: dict) -> None:
        parent, path = random_leaf(meta["attributes"]["depthcache"], rng)
        if rng.random() < 0.2:
            del parent[path[-1]]
        else:
            parent[path[-1]] = rng.choice(BAD_VALUES)
        change.what = f"attrs {'.'.join(path)}"  # type: ignore[attr-defined]
    edit_json(store / "zarr.json", change)
    return change.what  # type: ignore[attr-defined]


def mutate_metadata(store: Path, rng: random.Random) -> str:
    """Change one array's shape, data type, chunk shape, dimension names or codecs (or break its JSON)."""
    name = rng.choice(["resid_pre", "resid_final", "attn_out", "token_id", "position", "layer", "topk_ids",
                       "model/unembed", "model/final_norm_weight"])
    kind = rng.choice(["shape", "huge-shape", "dtype", "chunks", "dims", "codecs", "json"])
    path = store / name / "zarr.json"
    if kind == "json":
        path.write_text(path.read_text()[:-7])
        return f"{name} zarr.json truncated"

    def change(meta: dict) -> None:
        if kind == "shape":
            meta["shape"] = [s + rng.choice([-1, 1, 7]) for s in meta["shape"]]
        elif kind == "huge-shape":
            meta["shape"] = [10**12 for _ in meta["shape"]]
        elif kind == "dtype":
            meta["data_type"] = rng.choice(["float64", "int8", "uint16", "nonsense"])
        elif kind == "chunks":
            meta["chunk_grid"]["configuration"]["chunk_shape"] = [1 for _ in meta["shape"]]
        elif kind == "dims":
            meta["dimension_names"] = list(reversed(meta.get("dimension_names") or ["x"]))
        else:
            meta["codecs"] = meta["codecs"][:1]
    edit_json(path, change)
    return f"{name} {kind}"


def mutate_chunk(store: Path, rng: random.Random) -> str:
    """Flip a byte of, truncate, empty or delete one chunk object."""
    chunks = sorted(p for p in store.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(store.parent)))
    chunk = rng.choice(chunks)
    kind = rng.choice(["flip", "truncate", "empty", "delete"])
    data = bytearray(chunk.read_bytes())
    if kind == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        chunk.write_bytes(bytes(data))
    elif kind == "truncate":
        chunk.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "empty":
        chunk.write_bytes(b"")
    else:
        chunk.unlink()
    return f"{kind} {chunk.relative_to(store)}"


def mutate_hostile(store: Path, rng: random.Random) -> str:
    """A decompression bomb, deeply nested or oversized metadata, or damage to the model head or tokenizer."""
    kind = rng.choice(["bomb", "nested", "long-string", "model-flip", "model-delete"])
    if kind == "bomb":
        zstd = sorted(p for p in store.rglob("c/*") if p.is_file() and "zstd" in (
            next(a for a in p.parents if (a / "zarr.json").exists()) / "zarr.json").read_text())
        chunk = rng.choice(zstd)
        plant_bomb(chunk, rng.choice([2**31, 2**20]), rng.choice([None, 2**31, 2**40, 10]))
        return f"bomb in {chunk.relative_to(store)}"
    if kind == "nested":
        meta = rng.choice(sorted(store.rglob("zarr.json")))
        depth = rng.choice([40, 500, 100_000])
        if depth > 500:
            meta.write_text(nested_json(depth))
        else:
            edit_json(meta, lambda m: m.setdefault("attributes", {}).update(deep=json.loads(nested_json(depth))))
        return f"nested {depth} in {meta.relative_to(store)}"
    if kind == "long-string":
        def change(meta: dict) -> None:
            parent, path = random_leaf(meta["attributes"]["depthcache"], rng)
            parent[path[-1]] = "x" * 300_000
            change.what = ".".join(path)  # type: ignore[attr-defined]
        edit_json(store / "zarr.json", change)
        return f"long string at {change.what}"  # type: ignore[attr-defined]
    chunk = rng.choice(sorted(p for p in (store / "model").rglob("*") if p.is_file() and "/c/" in str(p)))
    if kind == "model-delete":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        chunk.write_bytes(bytes(data))
    return f"{kind} {chunk.relative_to(store)}"


@pytest.fixture(scope="module")
def clean_store(tiny_models, text_file, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A small valid store and the output of each analysis on it."""
    store = run(tmp_path_factory.mktemp("clean"), tiny_models["llama"], text_file, max_tokens=192)
    outputs = {}
    for name in ANALYSES:
        code, out = cli("analyze", name, str(store), "--results", str(store.parent / "results"))
        assert code == 0, out
        outputs[name] = out
    return store, outputs


def test_seeded_mutations_fail_cleanly_or_change_nothing(clean_store, tmp_path) -> None:
    store, reference = clean_store
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "1234")))
    outcomes: dict[str, int] = {}
    for i in range(N_MUTATIONS):
        target = tmp_path / f"m{i}.zarr"
        shutil.copytree(store, target)
        what = [mutate_attrs, mutate_metadata, mutate_chunk, mutate_hostile][i % 4](target, rng)
        calls = [("info", str(target)), ("validate", str(target))]
        calls += [("analyze", name, str(target), "--results", str(tmp_path / f"r{i}")) for name in ANALYSES]
        for args in calls:
            label = f"mutation {i} ({what}): {' '.join(args[:2])}"
            try:
                code, out = cli(*args)
            except AssertionError as exc:
                raise AssertionError(f"{label}: {exc}") from exc
            assert code in (0, 2), f"{label} exited {code}: {out}"
            assert "Traceback" not in out, f"{label}: {out}"
            if code == 2:
                assert out.startswith("error: "), f"{label}: {out}"
            elif args[0] == "analyze":  # success only where the numbers are exactly the clean store's
                assert out == reference[args[1]], f"{label} succeeded with different numbers"
            outcomes[f"{args[0]} {'ok' if code == 0 else 'refused'}"] = outcomes.get(
                f"{args[0]} {'ok' if code == 0 else 'refused'}", 0) + 1
        shutil.rmtree(target)
    assert outcomes.get("validate refused", 0) >= N_MUTATIONS // 2  # the mutations really damage the store


def test_absurd_sizes_are_refused_before_allocating(clean_store, tmp_path) -> None:
    store, _ = clean_store
    huge = tmp_path / "huge.zarr"
    shutil.copytree(store, huge)
    edit_json(huge / "zarr.json", lambda m: m["attributes"]["depthcache"]["layout"].update(n_tokens=10**15))
    code, out = cli("analyze", "residual-norms", str(huge), "--results", str(tmp_path / "r"))
    assert code == 2 and "more than" in out and "chunks" in out
    vocab = tmp_path / "vocab.zarr"
    shutil.copytree(store, vocab)
    edit_json(vocab / "zarr.json", lambda m: m["attributes"]["depthcache"]["model"].update(vocab_size=10**8))
    edit_json(vocab / "model" / "unembed" / "zarr.json", lambda m: m.update(shape=[10**8, 64]))
    with pytest.raises(DepthcacheError, match="memory|expected float32"):
        read_head(str(vocab))


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd.json", "sub/tokenizer.json", ".hidden.json",
                                  "tokenizer.py", "a\\..\\b.json"])
def test_tokenizer_file_names_cannot_escape(clean_store, tmp_path, name) -> None:
    store, _ = clean_store
    copy = tmp_path / "tok.zarr"
    shutil.copytree(store, copy)
    edit_json(copy / "model" / "tokenizer" / "file_0" / "zarr.json", lambda m: m["attributes"].update(filename=name))
    with pytest.raises(DepthcacheError, match="not allowed"):
        load_tokenizer(str(copy))
