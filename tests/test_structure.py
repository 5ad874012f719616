"""Package structure: no import cycle, and method names compared only inside the methods' own modules.

Both are read from the source (AST), so they hold for every import path, not only the ones a test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pgp_peft.methods import available_methods

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "pgp_peft"


def module_name(path: Path) -> str:
    parts = ["pgp_peft", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py") if "demo_data" not in path.parts}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body, functions included).

    `from X import y` counts as importing X.y when that is a module, else X. The implicit import of a
    module's parent packages is not an edge (every submodule would otherwise "import" the package)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:
                        edges.add(submodule)
                    elif target in modules:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_resolves_relative_imports():
    graph = import_graph()
    assert "pgp_peft.config" in graph["pgp_peft.methods.l2p"]
    assert "pgp_peft.methods.base" in graph["pgp_peft.methods.l2p"]
    assert "pgp_peft.methods" in graph["pgp_peft.model"]


def test_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def method_name_comparisons(path: Path, names: set[str]) -> list[int]:
    """Line numbers of comparisons (`==`, `!=`, `in`, `not in`) against a registered method's name."""

    def mentions(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(mentions(element) for element in node.elts)
        return False

    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and any(mentions(side) for side in [node.left, *node.comparators]):
            lines.append(node.lineno)
    return lines


def test_method_names_are_compared_only_in_the_methods_modules():
    names = set(available_methods())
    outside = {
        name: method_name_comparisons(path, names)
        for name, path in package_modules().items()
        if not name.startswith("pgp_peft.methods")
    }
    branches = {name: lines for name, lines in outside.items() if lines}
    assert branches == {}, f"method-name branches outside pgp_peft.methods: {branches}"
