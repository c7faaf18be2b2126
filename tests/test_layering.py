"""The architecture as a test: the import graph between depthcache's parts has no cycles and data flows one way.

Read from the source with ``ast`` (nothing is imported), so a new import that breaks the layering fails here.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "depthcache"
TORCH_FREE = ("store", "analyze")  # read stores, never a model
MODEL_FREE = ("store", "analyze", "tasks")  # never reach into model/ or extraction/


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage (``depthcache.store.io`` → ``store``) or top-level module."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "depthcache"


def imports(path: Path) -> set[str]:
    """Every absolute module imported anywhere in a file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    """Part → the depthcache parts it imports (the package root ``depthcache/__init__.py`` left out)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        source = part_of("depthcache." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        targets = {part_of(m) for m in imports(path) if m.startswith("depthcache.")}
        edges.setdefault(source, set()).update(targets - {source})
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_parts_import_each_other_without_cycles() -> None:
    assert cycle(graph()) is None, f"import cycle between depthcache parts: {' -> '.join(cycle(graph()))}"


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.parametrize("part", TORCH_FREE)
def test_store_and_analyses_never_import_torch(part: str) -> None:
    offenders = {str(p.relative_to(PACKAGE.parent)): m for p in (PACKAGE / part).rglob("*.py") for m in imports(p)
                 if m == "torch" or m.startswith("torch.")}
    assert not offenders, f"{part}/ must not import torch: {offenders}"


@pytest.mark.parametrize("part", MODEL_FREE)
def test_store_and_analyses_never_reach_into_the_model(part: str) -> None:
    forbidden = ("depthcache.model", "depthcache.extraction", "depthcache.locate", "depthcache.evaluate")
    offenders = {str(p.relative_to(PACKAGE.parent)): m for p in (PACKAGE / part).rglob("*.py") for m in imports(p)
                 if m.startswith(forbidden)}
    assert not offenders, f"{part}/ must read stores only: {offenders}"


@pytest.mark.parametrize("name", ["store.schema.json", "map-stats.schema.json"])
def test_packaged_schema_is_the_published_contract(name: str) -> None:
    published = PACKAGE.parent / "schemas" / name
    packaged = PACKAGE / "store" / name
    assert json.loads(packaged.read_text()) == json.loads(published.read_text())
    assert packaged.read_bytes() == published.read_bytes(), f"copy schemas/{name} into depthcache/store/"


def test_analyses_import_with_torch_unimportable() -> None:
    """Run in a fresh interpreter where ``import torch`` fails: the reader and every analysis still import."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import depthcache.analyze, depthcache.store\n"
            "depthcache.analyze.load_all()\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_store_format_doc_lists_every_array_of_the_table() -> None:
    """docs/store-format.md describes each array of the format's one table with the table's dims."""
    import re

    from depthcache.store.layout import ARRAYS

    doc = (PACKAGE.parent / "docs" / "store-format.md").read_text(encoding="utf-8")
    listed = {(m[1], tuple(d.strip() for d in m[2].split(",") if d.strip()))
              for m in re.finditer(r"^\s*(\w+)\s*\(([^)]*)\)", doc, flags=re.MULTILINE)}
    for name, spec in ARRAYS.items():
        assert (name, spec.dims) in listed, f"docs/store-format.md has no line '{name} ({', '.join(spec.dims)}) ...'"
