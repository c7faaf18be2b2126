"""The bounds a store may not exceed, read from the store schema's ``limits``: one source for the code that enforces
them (readers before allocating, writers before creating), the published schema and the docs."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_FILE = Path(__file__).parent / "store" / "store.schema.json"
LIMITS: dict[str, int] = {key: value for key, value in
                          json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))["limits"].items() if key != "description"}

MAX_METADATA_BYTES = LIMITS["max_metadata_bytes"]  # any zarr.json
MAX_JSON_DEPTH = LIMITS["max_json_depth"]  # nesting of the depthcache attributes (and any JSON depthcache parses)
MAX_CHUNKS = LIMITS["max_chunks_per_array"]
MAX_CHUNK_BYTES = LIMITS["max_chunk_bytes"]  # one decoded chunk of any array
MAX_D_MODEL = LIMITS["max_d_model"]
MAX_TOKENIZER_BYTES = LIMITS["max_tokenizer_bytes"]  # all tokenizer files together
MAX_TOKENIZER_FILES = LIMITS["max_tokenizer_files"]
MAX_RESULT_BYTES = LIMITS["max_result_bytes"]  # one cached analysis result, decoded
MAX_VARIABLE_CHUNK_BYTES = LIMITS["max_variable_chunk_bytes"]  # one decoded chunk of a variable-length (text) array
MAX_REPORTED_PROBLEMS = LIMITS["max_reported_problems"]  # lines validate prints; the rest are counted


def max_object_bytes(decoded_bytes: int) -> int:
    """Largest stored object a chunk of ``decoded_bytes`` can legitimately take: zstd's worst-case expansion of
    incompressible data (under 1/256), frame and block headers, and the 4-byte crc32c trailer, with room to spare."""
    return decoded_bytes + decoded_bytes // 128 + 4096
