"""Import layering: the core imports no outer package, and its modules form no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "benchmark"
OUTER = {"strategies", "streams", "reports"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, package: bool) -> list[str]:
    """Absolute names a statement imports: a module, or ``pkg.attr`` for each ``from pkg import attr``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package
        parent = module.split(".")[: len(module.split(".")) - node.level + (1 if package else 0)]
        base = ".".join([*parent, base] if base else parent)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported (not in functions or TYPE_CHECKING blocks)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack += node.body + node.orelse
        elif isinstance(node, (ast.Try, ast.With)):
            stack += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            stack += [h for handler in getattr(node, "handlers", []) for h in handler.body]
        elif isinstance(node, ast.ClassDef):
            stack += node.body


def _core_modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(CORE.rglob("*.py"))}


def test_the_core_imports_no_outer_package():
    """Anywhere in a core module (module level, functions, TYPE_CHECKING blocks): no strategies/streams/reports."""
    found = []
    for module, (path, tree) in _core_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _imported(node, module, path.name == "__init__.py")
                if any(name.split(".")[0] in OUTER for name in names):
                    found.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "the core imports an outer package:\n" + "\n".join(found)


def test_core_modules_import_each_other_without_a_cycle():
    modules = _core_modules()
    graph = {module: set() for module in modules}
    for module, (path, tree) in modules.items():
        for node in _top_level_imports(tree):
            for name in _imported(node, module, path.name == "__init__.py"):
                if name in modules and name != module:
                    graph[module].add(name)

    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":  # on the current path: back to it is a cycle
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            raise AssertionError("import cycle among core modules: " + " -> ".join(cycle))


def test_the_cycle_finder_sees_relative_and_from_imports():
    tree = ast.parse("from . import config\nfrom .registry import STREAMS\nimport benchmark.lazy\n")
    names = [n for node in _top_level_imports(tree) for n in _imported(node, "benchmark.cli", package=False)]
    assert {"benchmark.config", "benchmark.registry", "benchmark.lazy"} <= set(names)
