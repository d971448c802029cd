"""The package's import graph: no cycle, and imports only point down the layers of
docs/architecture.md. Every import statement counts, lazy ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "capfilt"

LAYERS: list[tuple[str, ...]] = [
    ("utils",),
    ("config",),
    ("data",),
    ("model",),
    ("runs",),
    ("train", "eval"),
    ("pipeline",),
    ("report",),
    ("cli",),
]
"""Bottom to top. A module may import its own sub-package and any sub-package of a lower layer;
sub-packages that share a layer (train, eval) do not import each other."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """capfilt modules that ``path`` imports (the deepest existing module of each dotted name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("capfilt") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def subpackage(module: str) -> str | None:
    """``capfilt.model.folder`` -> ``model``; the root ``capfilt`` (version only) -> None."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return "cli" if parts[1] == "__main__" else parts[1]  # `python -m capfilt` is the CLI


def layer_of(module: str) -> int:
    sub = subpackage(module)
    for level, names in enumerate(LAYERS):
        if sub in names:
            return level
    raise AssertionError(f"{module}: sub-package {sub!r} is in no layer; add it to LAYERS")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_root_module_imports_nothing_of_the_package():
    assert import_graph()["capfilt"] == set()


def test_every_module_belongs_to_a_layer():
    for module in all_modules():
        if module != "capfilt":
            layer_of(module)


def test_no_import_points_up_or_sideways():
    offending = []
    for module, targets in import_graph().items():
        if module == "capfilt":
            continue
        for target in targets:
            if target == "capfilt" or subpackage(target) == subpackage(module):
                continue
            if layer_of(target) >= layer_of(module):
                offending.append(f"{module} -> {target}")
    assert not offending, "imports against the layer order:\n" + "\n".join(sorted(offending))


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_claim():
    # The checker itself: a cycle and an upward import in a hand-made graph are found.
    graph = {
        "capfilt.data.a": {"capfilt.data.b"},
        "capfilt.data.b": {"capfilt.data.a"},
        "capfilt.utils.x": set(),
    }
    assert find_cycles(graph) == [["capfilt.data.a", "capfilt.data.b"]]
    assert layer_of("capfilt.data.reader") > layer_of("capfilt.utils.files")
    assert layer_of("capfilt.train.trainer") == layer_of("capfilt.eval.retrieval")
