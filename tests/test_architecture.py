"""The package's shape: the import graph, built from the source (function-level imports included), has no
cycle, and every import points down the order of parts that docs/design.md gives."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_inject"

# The order of the parts, lowest first (docs/design.md, "Which part may import which"). A module may import
# modules of a lower rank, and of its own rank only inside its own part (folder or top-level module).
RANKS = {
    "lora_inject.errors": 0,
    "lora_inject.version": 0,
    "lora_inject.guards": 0.5,  # uses errors only; quantized and everything above read shapes through it
    "lora_inject.threads": 0.6,  # per-thread views and the model lock; layers read views through it
    "lora_inject.quantized": 1,  # the package's __init__ re-exports the registry only
    "lora_inject.quantized.registry": 1,
    "lora_inject.layers": 2,
    "lora_inject.targeting.matching": 3,
    "lora_inject.config": 4,
    "lora_inject.targeting": 5,
    "lora_inject.inject": 6,
    "lora_inject.merging": 7,
    "lora_inject.optim": 7,
    "lora_inject.formats": 8,
    "lora_inject.quantized.loftq": 9,
    "lora_inject.serving": 9,
    "lora_inject.checkpoint": 9,
    "lora_inject.integrations": 10,
    "lora_inject.hf": 11,
    "lora_inject.trl": 11,
    "lora_inject.distributed": 11,
    "lora_inject.diffusers": 11,
    "lora_inject": 12,  # the public face
    "lora_inject.cli": 13,  # the command and its demo use the public face
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ``lora_inject`` module that ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "lora_inject")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "lora_inject":
                target = node.module
            else:
                continue
            for alias in node.names:  # ``from . import x`` imports the module x
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def rank(name: str) -> tuple[int, str]:
    """The rank of the longest entry of RANKS that ``name`` falls under, and that entry (its part)."""
    entry = max((k for k in RANKS if name == k or name.startswith(k + ".")), key=len)
    return RANKS[entry], entry


def part(name: str) -> str:
    """The folder (or top-level module) a module belongs to."""
    return ".".join(name.split(".")[:2])


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_parts():
    wrong = []
    for name, targets in import_graph().items():
        own, _ = rank(name)
        for target in targets:
            theirs, _ = rank(target)
            if theirs > own or (theirs == own and part(target) != part(name)):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_in_the_graph(tmp_path):
    source = tmp_path / "lora_inject" / "x.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from .y import z\n    import lora_inject.w\n")
    known = {"lora_inject.x", "lora_inject.y", "lora_inject.w"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "lora_inject"
    try:
        assert imports_of("lora_inject.x", source, known) == {"lora_inject.y", "lora_inject.w"}
    finally:
        PACKAGE = saved


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_has_a_rank(name):
    rank(name)  # raises ValueError (max of nothing) for a module outside every part


def test_the_top_level_shows_only_what_every_part_shares():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    aliases = {"hf.py", "trl.py", "distributed.py", "diffusers.py"}  # the documented names of four integrations
    assert len(set(top) - aliases) <= 9, top
    for alias in aliases:
        assert "sys.modules[__name__] = _module" in (PACKAGE / alias).read_text()
