"""The package's layout rules: sinks that do not import methods, no method named outside
``tta_cli/methods`` (methods declare what they need), short files and functions, no import cycles."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tta_cli.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tta_cli"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "tta_cli":
                names.update(f"tta_cli.{a.name}" for a in node.names)
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_sinks_never_import_methods() -> None:
    for path, tree in _modules():
        if "sinks" in path.relative_to(PACKAGE).parts:
            bad = [n for n in _imported(tree) if n.startswith("tta_cli.methods")]
            assert not bad, f"{path.name} imports {bad}"


def test_no_method_name_is_compared_outside_methods() -> None:
    """What a method needs is declared on it (data_parallel, clean_data, changes_predictions...)."""
    names = set(list_methods())
    for path, tree in _modules():
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            constants = {c.value for c in operands if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            about_methods = any("method" in ast.unparse(c) for c in operands if not isinstance(c, ast.Constant))
            assert not (about_methods and names & constants), \
                f"{path.relative_to(ROOT)}:{node.lineno} compares a method name"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_are_short(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: over {MAX_FILE_LINES} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
            length = (node.end_lineno or 0) - body[0].lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} has {length} lines"


def _loaded_with(tree: ast.Module) -> set[str]:
    """What importing the module imports: its top-level imports (not those inside functions or
    under ``if TYPE_CHECKING``)."""
    kept: list[ast.stmt] = []
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.If | ast.Try):
            stack.extend([*node.body, *node.orelse, *getattr(node, "finalbody", [])])
        elif isinstance(node, ast.Import | ast.ImportFrom):
            kept.append(node)
    return _imported(ast.Module(body=kept, type_ignores=[]))


def test_no_import_cycles() -> None:
    graph = {_module_name(path): _loaded_with(tree) for path, tree in _modules()}
    modules = set(graph) - {"tta_cli"}  # the package itself is imported first, always
    # a submodule's import of its own package (loaded before it) is no cycle
    graph = {m: {n for n in deps if n in modules and n != m and not m.startswith(n + ".")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in graph[module]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
