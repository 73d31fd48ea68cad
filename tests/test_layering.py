"""Import layering: the core imports no outer package, and no package's modules form an import cycle (function-level
imports counted)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "benchmark"
OUTER = {"strategies", "streams", "reports"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
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


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.Module):
    """Every import statement that can run: at module level, in functions, methods and class bodies (a function-level
    import closes a cycle as surely as a top-level one, only later); not those of ``TYPE_CHECKING`` blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not _is_type_checking(node):
            stack += list(ast.iter_child_nodes(node))


def _modules(package: Path) -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(package.rglob("*.py"))}


def _core_modules() -> dict[str, tuple[Path, ast.Module]]:
    return _modules(CORE)


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


def _cycle(modules: dict[str, tuple[Path, ast.Module]]) -> list[str] | None:
    """An import cycle among ``modules`` (each module's every import, :func:`_imports`), or None."""
    graph = {module: set() for module in modules}
    for module, (path, tree) in modules.items():
        for node in _imports(tree):
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
            return cycle
    return None


@pytest.mark.parametrize("package", ["benchmark", *sorted(OUTER)])
def test_a_package_s_modules_import_each_other_without_a_cycle(package: str):
    """Within each package, counting function-level imports too: no cycle (one hidden in a function is still one)."""
    cycle = _cycle(_modules(ROOT / package))
    assert cycle is None, f"import cycle among {package} modules: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_relative_from_and_function_level_imports():
    tree = ast.parse("from . import config\nfrom .registry import STREAMS\nimport benchmark.lazy\n"
                     "def f():\n    from benchmark.jobs import run_jobs\n"
                     "if TYPE_CHECKING:\n    from benchmark.runner import run_one\n")
    names = {n for node in _imports(tree) for n in _imported(node, "benchmark.cli", package=False)}
    assert {"benchmark.config", "benchmark.registry", "benchmark.lazy", "benchmark.jobs"} <= names
    assert "benchmark.runner" not in names  # a TYPE_CHECKING import never runs


def test_a_cycle_closed_by_a_function_level_import_is_found():
    modules = {"p.a": (Path("a.py"), ast.parse("from p.b import x\n")),
               "p.b": (Path("b.py"), ast.parse("def f():\n    from p.a import y\n"))}
    assert _cycle(modules) == ["p.a", "p.b", "p.a"]


def test_every_registered_stream_provides_what_the_core_reads_of_a_stream():
    """The core reads a stream through benchmark.stream.Stream only: every registered stream has its methods, and
    the streams' spec dataclass every field of its StreamSpec protocol (e.g. ``vqa_parse``)."""
    import dataclasses
    import typing

    from benchmark import stream
    from benchmark.registry import STREAMS
    from streams.base import StreamSpec

    methods = [name for name, value in vars(stream.Stream).items() if callable(value) and not name.startswith("_")]
    assert {"dataset", "sessions", "benchmark"} <= set(methods)
    for name in STREAMS.names():
        missing = [m for m in methods if not callable(getattr(STREAMS.get(name).obj, m, None))]
        assert not missing, f"stream '{name}' lacks {missing}"
    fields = {f.name for f in dataclasses.fields(StreamSpec)}
    assert set(typing.get_type_hints(stream.StreamSpec)) <= fields
