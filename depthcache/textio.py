"""User text files (datasets, task files): read as UTF-8 text, with one clear error for anything else."""

from __future__ import annotations

from pathlib import Path

from depthcache.errors import DepthcacheError


def read_text(path: Path) -> str:
    """The contents of a UTF-8 text file; a binary file (a NUL byte) or another encoding is refused, naming the
    offending byte offset and what to do."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DepthcacheError(f"cannot read {path}: {exc.strerror or exc}") from exc
    nul = data.find(b"\0")
    if nul >= 0:
        raise DepthcacheError(f"{path} is not a text file (a NUL byte at offset {nul:,}): give UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DepthcacheError(f"{path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start:,}): "
                              "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from exc
