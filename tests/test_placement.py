"""Models placed over devices, the host and disk (--device-map, --max-memory, --offload-folder) and --model-dtype:
the options parsed, a forced offload on CPU giving a store bit-identical to the in-memory run, a model the user
dispatched, and a model too large for memory refused with the options that make it fit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import zarr
from click.testing import CliRunner
from conftest import save_tiny_model, write_documents

import depthcache
from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction import preflight
from depthcache.extraction.engine import ExtractOptions, extract
from depthcache.model import Placement, load_model, weight_bytes
from depthcache.model.loading import parameters_sha256
from depthcache.model.placement import parse_max_memory, read_device_map
from depthcache.store.schema import validate

TEXTS = ["The quick brown fox jumps over the lazy dog. Residual streams carry information from layer to layer.",
         "Numbers: 0 1 2 3 4 5 6 7 8 9 + - = ( ) and some punctuation, too!"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-style model folder, 6 layers, so an offloaded map has layers in memory and on disk."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("placed") / "llama", n_layers=6)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few documents of different lengths."""
    return write_documents(tmp_path_factory.mktemp("placed-docs") / "docs.jsonl", [3, 1, 5, 2])


def options(out: Path, model: Path, docs: Path, **kw: object) -> ExtractOptions:
    """A small float32 extraction on CPU (exact comparisons)."""
    kw = {"device": "cpu", **kw}
    return ExtractOptions(out=str(out), model=str(model), data=str(docs), max_tokens=200, seq_len=32, batch_size=3,
                          dtype="float32", progress=False, chunk_tokens=64, **kw)


def arrays(store: Path) -> dict[str, bytes]:
    """Every array of a store, root and model group, as bytes."""
    root = zarr.open_group(str(store), mode="r")
    found = {name: np.asarray(arr[...]).tobytes() for name, arr in root.arrays()}
    return found | {f"model/{n}": np.asarray(a[...]).tobytes() for n, a in root["model"].arrays()}


@pytest.fixture(scope="module")
def in_memory(model_dir: Path, docs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the whole model in memory."""
    out = tmp_path_factory.mktemp("placed-stores") / "memory.zarr"
    extract(options(out, model_dir, docs))
    return out


def offloading_budget(model_dir: Path) -> int:
    """Host bytes that hold about a third of the tiny model's float32 weights: the rest must go to disk."""
    return weight_bytes(model_dir, torch.float32) // 3


def test_max_memory_and_device_maps_parse_or_are_refused_in_one_line(tmp_path: Path) -> None:
    assert parse_max_memory("cuda:0=70GiB, 1=512MiB,cpu=1.5GB") == {0: 70 * 2**30, 1: 512 * 2**20, "cpu": 1_500_000_000}
    assert parse_max_memory(None) == {}
    for bad in ("cuda:0", "gpu=1GiB", "cpu=lots", "cpu=12XB"):
        with pytest.raises(DepthcacheError, match="--max-memory"):
            Placement(max_memory=bad)
    assert read_device_map("balanced") == "balanced"
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu",
                                   "model.norm": "disk"}))
    assert read_device_map(str(mapping)) == {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu",
                                             "model.norm": "disk"}
    mapping.write_text(json.dumps({"model.layers": "tpu"}))
    with pytest.raises(DepthcacheError, match="'tpu' is not a GPU index"):
        Placement(device_map=str(mapping))
    with pytest.raises(DepthcacheError, match="neither a strategy"):
        Placement(device_map=str(tmp_path / "missing.json"))
    with pytest.raises(DepthcacheError, match="--model-dtype"):
        Placement(model_dtype="int8")
    assert Placement().dtype("cpu") == torch.float32 and Placement(model_dtype="float16").dtype("cpu") == torch.float16
    assert Placement().load_kwargs("cpu") == {}


def test_forced_offload_to_disk_gives_a_bit_identical_store(model_dir: Path, docs: Path, in_memory: Path,
                                                            tmp_path: Path) -> None:
    budget = offloading_budget(model_dir)
    out = tmp_path / "offload.zarr"
    attrs = extract(options(out, model_dir, docs, placement=Placement(max_memory=f"cpu={budget}B",
                                                                       offload_folder=str(tmp_path / "off"))))
    placed = attrs["options"]["device_map"]
    assert placed.get("disk", 0) >= 3 and placed.get("cpu", 0) >= 1, placed  # most layers on disk, some in memory
    assert attrs["options"]["model_dtype"] == "float32"
    assert attrs["model"]["load_check"]["identity_error"] <= 1e-5
    assert arrays(out) == arrays(in_memory)
    assert not validate(str(out), read_chunks=True)


def test_cli_offload_options_give_the_same_store(model_dir: Path, docs: Path, in_memory: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(main, ["extract", "--model", str(model_dir), "--data", str(docs), "--out", str(out),
                                       "--max-tokens", "200", "--seq-len", "32", "--batch-size", "3", "--dtype",
                                       "float32", "--device", "cpu", "--chunk-tokens", "64", "--no-progress",
                                       "--max-memory", f"cpu={offloading_budget(model_dir)}B", "--offload-folder",
                                       str(tmp_path / "off")])
    assert result.exit_code == 0, result.output
    assert arrays(out) == arrays(in_memory)
    bad = CliRunner().invoke(main, ["extract", "--model", str(model_dir), "--out", str(tmp_path / "x.zarr"),
                                    "--max-memory", "cuda0=1GiB"])
    assert bad.exit_code == 2 and "error: --max-memory: 'cuda0=1GiB' is not DEVICE=SIZE" in bad.output
    assert not (tmp_path / "x.zarr").exists()


def test_a_model_the_user_dispatched_extracts_to_a_valid_identical_store(model_dir: Path, tmp_path: Path) -> None:
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    placed = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, device_map="auto", max_memory={"cpu": offloading_budget(model_dir)},
        offload_folder=str(tmp_path / "off"))
    assert "disk" in placed.hf_device_map.values()
    assert placed.lm_head.weight.device.type == "meta"  # its head is offloaded too
    kw = dict(tokenizer=tokenizer, dtype="float32", seq_len=24, chunk_tokens=32, progress=False)
    ours = depthcache.extract(placed, TEXTS, out=tmp_path / "placed.zarr", **kw)
    theirs = depthcache.extract(plain, TEXTS, out=tmp_path / "plain.zarr", **kw)
    assert not validate(str(tmp_path / "placed.zarr"), read_chunks=True)
    assert arrays(tmp_path / "placed.zarr") == arrays(tmp_path / "plain.zarr")
    assert ours.attrs["depthcache"]["model"]["weights_sha256"] == parameters_sha256(plain)  # offloaded weights read
    assert theirs.attrs["depthcache"]["options"].get("device_map") is None
    assert placed.lm_head.weight.device.type == "meta"  # depthcache left the user's model as it was
    with pytest.raises(DepthcacheError, match="model named by spec"):
        depthcache.extract(placed, TEXTS, out=tmp_path / "x.zarr", max_memory="cpu=1GiB", **kw)
    del kw["tokenizer"]
    by_spec = depthcache.extract(str(model_dir), TEXTS, out=tmp_path / "spec.zarr", device="cpu",
                                 max_memory=f"cpu={offloading_budget(model_dir)}B", offload_folder=str(tmp_path / "o"),
                                 **kw)
    assert by_spec.attrs["depthcache"]["options"]["device_map"].get("disk", 0) >= 3
    assert arrays(tmp_path / "spec.zarr") == arrays(tmp_path / "plain.zarr")


def test_a_model_too_large_for_memory_is_refused_then_runs_with_an_offload_folder(
        model_dir: Path, docs: Path, in_memory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "weights_room", lambda device: offloading_budget(model_dir))
    out = tmp_path / "big.zarr"
    with pytest.raises(DepthcacheError, match=r"in float32 and cpu has .*GiB free: run with --max-memory cpu=.* "
                                              r"--offload-folder DIR .*or --model-dtype bfloat16.*nothing was written"):
        extract(options(out, model_dir, docs))
    assert not out.exists()
    with pytest.raises(DepthcacheError, match=r"add --offload-folder DIR \(the .*GiB beyond --max-memory"):
        extract(options(out, model_dir, docs, placement=Placement(device_map="auto")))
    assert not out.exists()
    attrs = extract(options(out, model_dir, docs, placement=Placement(offload_folder=str(tmp_path / "off"))))
    assert attrs["options"]["device_map"].get("disk", 0) >= 1
    assert arrays(out) == arrays(in_memory)


def test_model_dtype_is_recorded_checked_at_its_tolerance_and_kept_on_resume(model_dir: Path, docs: Path,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "bf16.zarr"
    attrs = extract(options(out, model_dir, docs, placement=Placement(model_dtype="bfloat16")))
    assert attrs["options"]["model_dtype"] == "bfloat16"
    assert 1e-5 < attrs["model"]["load_check"]["identity_error"] <= 3e-2  # bf16 rounding, within bf16's tolerance
    loaded = load_model(str(model_dir), placement=Placement(model_dtype="bfloat16"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(DepthcacheError, match="options.model_dtype: store has 'bfloat16', this run has 'float32'"):
        extract(options(out, model_dir, docs, resume=True))


@pytest.mark.parametrize("command", [["erase", "--reference-windows", "1"], ["igrad", "--steps", "4", "--max-steps", "4"]])
def test_erase_and_igrad_with_offloaded_layers_give_the_same_map(command: list[str], model_dir: Path,
                                                                 tmp_path: Path) -> None:
    common = [*command, "--model", str(model_dir), "--prompt", "The quick brown", "--answer", " fox", "--device",
              "cpu", "--model-dtype", "float32", "--no-progress"]
    plain = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "plain.zarr")])
    placed = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "placed.zarr"), "--max-memory",
                                       f"cpu={offloading_budget(model_dir)}B", "--offload-folder",
                                       str(tmp_path / "off")])
    assert plain.exit_code == 0 and placed.exit_code == 0, plain.output + placed.output
    a, b = (zarr.open_group(str(tmp_path / f"{n}.zarr"), mode="r") for n in ("plain", "placed"))
    assert {n: np.asarray(x[...]).tobytes() for n, x in a.arrays()} == \
        {n: np.asarray(x[...]).tobytes() for n, x in b.arrays()}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (layers split across GPUs)")
def test_a_model_split_over_two_gpus_matches_one_gpu(model_dir: Path, docs: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                                   **{f"model.layers.{i}": i % 2 for i in range(6)}}))
    one = extract(options(tmp_path / "one.zarr", model_dir, docs, device="cuda:0",
                          placement=Placement(model_dtype="float32")))
    two = extract(options(tmp_path / "two.zarr", model_dir, docs, device="cuda",
                          placement=Placement(device_map=str(mapping), model_dtype="float32")))
    assert two["options"]["device_map"] == {"cuda:0": 5, "cuda:1": 5} and "device_map" not in one["options"]
    a, b = (zarr.open_group(str(tmp_path / f"{n}.zarr"), mode="r") for n in ("one", "two"))
    for name, arr in a.arrays():
        np.testing.assert_allclose(np.asarray(b[name][...]), np.asarray(arr[...]), rtol=1e-5, atol=1e-6)


def test_documented_load_check_tolerances_are_the_checks_own() -> None:
    from depthcache.model.check import TOLERANCES

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    found = re.findall(r"^\| (float32|float16|bfloat16) \| ([\de.-]+) \| ([\de.-]+) \|$", text, flags=re.M)
    rows = {name: (float(identity), float(logits)) for name, identity, logits in found}
    assert rows == {name: TOLERANCES[dtype] for name, dtype in
                    (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16))}


def test_every_command_running_a_model_takes_the_placement_options() -> None:
    from test_cli_options import MODEL_COMMANDS, command, option

    for path in MODEL_COMMANDS:
        for name in ("device-map", "max-memory", "offload-folder", "model-dtype"):
            assert option(command(*path), name).help == option(command("extract"), name).help, (path, name)
    assert "Llama-3.1-70B --device-map auto" in CliRunner().invoke(main, ["extract", "--help"]).output
