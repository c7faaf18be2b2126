"""The command line: clear one-line errors, nothing lost on a full disk, and the real default model end to end."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_extract import run
from test_resume import arrays

from depthcache.cli import main
from depthcache.errors import DepthcacheError
from depthcache.extraction import writer as writer_module
from depthcache.store.reader import open_dataset


def invoke(*args: str):  # noqa: ANN201 - click Result
    """Run the CLI in-process."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_user_mistakes_are_one_line_errors(tiny_models, text_file, tmp_path) -> None:
    result = invoke("extract", "--model", str(tmp_path / "nope"), "--data", str(text_file), "--out",
                    str(tmp_path / "x.zarr"), "--device", "cpu")
    assert result.exit_code == 2 and result.output.startswith("error: no such model path")
    assert "Traceback" not in result.output and not (tmp_path / "x.zarr").exists()
    result = invoke("info", str(tmp_path / "missing.zarr"))
    assert result.exit_code == 2 and "no depthcache store" in result.output


def test_info_and_validate_describe_a_store(tiny_models, text_file, tmp_path) -> None:
    store = run(tmp_path, tiny_models["gpt2"], text_file, dtype="bfloat16", layers="0-1,3")
    out = invoke("info", str(store)).output
    assert "layers     3 of 4 stored (0-1,3)" in out and "(complete)" in out and "compression ×" in out
    out = invoke("validate", str(store)).output
    assert out.startswith(f"{store}: valid; read and verified 3 model head arrays (crc32c), 2 tokenizer files "
                          "(sha256)") and "activation and token chunks (crc32c)" in out


def test_full_disk_loses_nothing_and_resume_completes(tiny_models, text_file, tmp_path, monkeypatch) -> None:
    reference = run(tmp_path, tiny_models["llama"], text_file, name="reference.zarr")
    real_write = writer_module.ChunkWriter._write
    calls = {"n": 0}

    def fail_after_first_chunk(self, name, stop):  # noqa: ANN001, ANN202 - patched method
        if self.chunk_start >= 2 * self.chunk_tokens:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return real_write(self, name, stop)

    monkeypatch.setattr(writer_module.ChunkWriter, "_write", fail_after_first_chunk)
    with pytest.raises(DepthcacheError, match="disk full .* 128 tokens are committed"):
        run(tmp_path, tiny_models["llama"], text_file, name="full.zarr")
    assert open_dataset(tmp_path / "full.zarr").sizes["token"] == 128
    monkeypatch.setattr(writer_module.ChunkWriter, "_write", real_write)
    run(tmp_path, tiny_models["llama"], text_file, name="full.zarr", resume=True)
    assert arrays(tmp_path / "full.zarr") == arrays(reference)


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path) -> None:
    data = tmp_path / "facts.jsonl"
    data.write_text(json.dumps({"text": "The capital of France is"}) + "\n" +
                    json.dumps({"text": "Python is a programming language that lets you work quickly."}))
    store = tmp_path / "smol.zarr"
    result = invoke("extract", "--data", str(data), "--out", str(store), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    ds = open_dataset(store).load()
    assert ds.sizes["layer"] == 30 and ds.sizes["d_model"] == 576 and ds.resid_pre.dtype.name == "bfloat16"
    from depthcache.store.head import load_tokenizer

    tok = load_tokenizer(store)
    last = int(np.flatnonzero(ds.doc_id.values == 0)[-1])
    assert tok.decode([int(ds.topk_ids.values[last, 0])]) == " Paris"
    # bf16 storage keeps the residual identity to bf16 rounding of the (large) residual
    h = ds.resid_pre.values.astype(np.float32)
    step = h[:-1] + ds.attn_out.values[:-1].astype(np.float32) + ds.mlp_out.values[:-1].astype(np.float32)
    rel = np.linalg.norm(step - h[1:], axis=-1) / np.linalg.norm(h[1:], axis=-1)
    assert np.median(rel) < 0.01
