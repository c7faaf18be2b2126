"""Write a JSONL corpus of varied text made on this machine from Python itself: its documentation topics (prose)
interleaved with its standard library's sources (code), one document per topic or module, in a fixed order.

    python benchmarks/mixed_corpus.py OUT.jsonl [--max-chars N]

Used by the layer-map run at scale (docs/compare.md): no third-party text, the same bytes on every machine with the
same Python.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from itertools import zip_longest
from pathlib import Path
from pydoc_data.topics import topics


def documents(max_chars: int) -> list[str]:
    """Prose and code documents alternating, until ``max_chars`` characters."""
    prose = [topics[k] for k in sorted(topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(errors="replace") for p in sorted(lib.glob("*.py"))]
    out, total = [], 0
    for pair in zip_longest(prose, code):
        for text in pair:
            if text and total < max_chars:
                out.append(text[:20000])
                total += len(out[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    args = parser.parse_args()
    docs = documents(args.max_chars)
    Path(args.out).write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    print(f"{args.out}: {len(docs)} documents, {sum(map(len, docs)):,} characters")


if __name__ == "__main__":
    main()
