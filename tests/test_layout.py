"""The package's layout: no import cycles between its modules, and a pinned set of public names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import looppool

PACKAGE_DIR = Path(looppool.__file__).resolve().parent

#: What ``from looppool import *`` gives; a change here is a change of the public API.
EXPORTED = {
    "FunctionWorker",
    "HookNameWarning",
    "LooppoolError",
    "MessageTimeout",
    "Pool",
    "PoolBroken",
    "PoolClosed",
    "PoolStats",
    "QueueFull",
    "RemoteError",
    "RemoteTraceback",
    "SafeWorker",
    "Worker",
    "WorkerFactory",
    "WorkerLost",
    "WorkerStartError",
    "__version__",
}


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Every module of a package, by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` tests ``TYPE_CHECKING`` (or ``typing.TYPE_CHECKING``)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(nodes: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among ``nodes`` and inside them, except under ``if TYPE_CHECKING``.

    Imports inside functions count: a deferred import is the usual way to hide
    a cycle, and the two modules still need each other.
    """
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _import_nodes([child])
                elif isinstance(child, ast.excepthandler):
                    yield from _import_nodes(child.body)


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports (absolute and relative imports)."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, node.module] if node.module else parts)
        for alias in node.names:
            # ``from . import _protocol`` imports a module; ``from ._core import
            # PoolStats`` imports a name of one.
            submodule = f"{base}.{alias.name}"
            if submodule in modules:
                found.add(submodule)
            elif base in modules:
                found.add(base)
    found.discard(name)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of ``graph`` (Tarjan), as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        # The shortest way back to the component's first module names one cycle in it.
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        cycle: list[str] | None = None
        while cycle is None:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node] & component):
                    if nxt == start:
                        cycle = [*paths[node], start]
                        break
                    if nxt not in paths:
                        paths[nxt] = [*paths[node], nxt]
                        following.append(nxt)
                if cycle is not None:
                    break
            frontier = following
        cycles.append(cycle)
    return sorted(cycles)


def test_find_cycles_names_each_cycle_once() -> None:
    """The cycle finder reports one cycle per tangle, and nothing for a graph without cycles."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]


def test_imports_of_counts_what_runs(tmp_path: Path) -> None:
    """Absolute, relative and deferred imports are edges; TYPE_CHECKING imports are not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "import pkg.b\nfrom . import c\n\ndef f():\n    from .sub import d\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "c.py": "import os\ntry:\n    from .sub.d import D\nexcept ImportError:\n    pass\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import b\nfrom ..sub import e\n",
        "sub/e.py": "class E:\n    from pkg import c\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    modules = package_modules(package)
    graph = {name: imports_of(name, modules) for name in modules}
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.c", "pkg.sub.d"},
        "pkg.b": set(),
        "pkg.c": {"pkg.sub.d"},
        "pkg.sub": set(),
        "pkg.sub.d": {"pkg.b", "pkg.sub.e"},
        "pkg.sub.e": {"pkg.c"},
    }
    assert find_cycles(graph) == [["pkg.c", "pkg.sub.d", "pkg.sub.e", "pkg.c"]]


def test_no_import_cycles() -> None:
    """No module of the package imports, directly or not, a module that imports it."""
    modules = package_modules(PACKAGE_DIR)
    graph = {name: imports_of(name, modules) for name in modules}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/looppool:\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles
    )


def test_exported_names_are_pinned() -> None:
    """``looppool.__all__`` is exactly the public API, and every name in it exists."""
    assert len(looppool.__all__) == len(set(looppool.__all__)), "a name is exported twice"
    assert set(looppool.__all__) == EXPORTED
    missing = [name for name in looppool.__all__ if not hasattr(looppool, name)]
    assert not missing, f"looppool.__all__ names what looppool does not have: {missing}"
