"""Layers point down: no llmd module imports, however indirectly, a module that imports it."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Set
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmd"

Graph = Mapping[str, Set[str]]


def module_name(path: Path, package: Path) -> str:
    """The dotted name of a file under llmd/ ("llmd.config", "llmd" for llmd/__init__.py)."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the llmd modules it imports anywhere: at the top, in functions, for typing."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    root = package.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    # `from . import x` in llmd/a.py is relative to llmd; in llmd/__init__.py too.
                    up = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*up, base] if base else up)
                # `from llmd import config` imports the module llmd.config, not a name.
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add(sub if sub in files else base)
        deps = set()
        for imported in found:
            if imported != root and not imported.startswith(root + "."):
                continue
            # `import llmd.x.y` where only llmd.x is a file: the edge goes to the file.
            while imported not in files and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in files and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """Every simple cycle once, as a path that starts and ends at its smallest module.

    A module importing itself is not a cycle. Cycles come sorted, so messages are stable.
    """
    cycles: list[list[str]] = []
    for start in sorted(graph):
        # Only nodes above `start` may be on the path: each cycle is found from its smallest node.
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ()), reverse=True):
                if nxt == start and len(path) > 1:
                    cycles.append([*path, start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return sorted(cycles)


@pytest.mark.parametrize(
    ("graph", "cycles"),
    [
        pytest.param({}, [], id="empty"),
        pytest.param({"a": {"b"}, "b": {"c"}, "c": set()}, [], id="chain"),
        pytest.param({"a": {"b", "c"}, "b": {"c"}, "c": set()}, [], id="diamond"),
        pytest.param({"a": {"a"}}, [], id="self-import-ignored"),
        pytest.param({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]], id="two-cycle"),
        pytest.param(
            {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]], id="three"
        ),
        pytest.param(
            {"c": {"a"}, "a": {"b"}, "b": {"c"}}, [["a", "b", "c", "a"]], id="three-from-largest"
        ),
        pytest.param(
            {"x": {"a", "m"}, "a": {"x"}, "m": {"x"}},
            [["a", "x", "a"], ["m", "x", "m"]],
            id="two-cycles-through-one-module",
        ),
        pytest.param(
            {"a": {"b"}, "b": {"a", "c"}, "c": {"a"}},
            [["a", "b", "a"], ["a", "b", "c", "a"]],
            id="nested",
        ),
        pytest.param({"a": {"b"}, "b": {"z"}}, [], id="edge-to-unknown-module"),
    ],
)
def test_find_cycles(graph: Graph, cycles: list[list[str]]) -> None:
    """The cycle finder reports each simple cycle once, from its smallest module."""
    assert find_cycles(graph) == cycles


def test_import_graph_reads_every_kind_of_import(tmp_path: Path) -> None:
    """Imports at the top, in functions, under TYPE_CHECKING and relative ones all count."""
    pkg = tmp_path / "llmd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "1"\n')
    (pkg / "a.py").write_text("from llmd import b, __version__\n")
    (pkg / "b.py").write_text("def f():\n    import llmd.c\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmd.d import X\n"
    )
    (pkg / "d.py").write_text("from . import a\nfrom .d import Y\nimport json\n")
    graph = import_graph(pkg)
    assert graph == {
        "llmd": set(),
        "llmd.a": {"llmd", "llmd.b"},
        "llmd.b": {"llmd.c"},
        "llmd.c": {"llmd.d"},
        "llmd.d": {"llmd.a"},
    }
    assert find_cycles(graph) == [["llmd.a", "llmd.b", "llmd.c", "llmd.d", "llmd.a"]]


def test_no_import_cycles() -> None:
    """No llmd module imports one that imports it back, directly or through others."""
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in llmd:\n" + "\n".join(" -> ".join(c) for c in cycles)


def loose_tasks(package: Path = PACKAGE) -> list[str]:
    """`x.create_task(...)` calls whose receiver is not a TaskGroup (`tg`, `self._tg`), and
    `ensure_future` calls: background work nobody owns (ruff bans `asyncio.create_task`, but
    not `loop.create_task`)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            receiver = ast.unparse(node.func.value)
            if node.func.attr == "ensure_future" or (
                node.func.attr == "create_task" and receiver not in ("tg", "self._tg")
            ):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_background_tasks_are_owned_by_a_task_group() -> None:
    """Every task llmd starts belongs to a TaskGroup: the daemon's, or one a method opens."""
    assert loose_tasks() == []


def test_loose_tasks_are_found(tmp_path: Path) -> None:
    """The check above sees a task started on the loop."""
    pkg = tmp_path / "llmd"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        "import asyncio\n"
        "async def f(tg):\n"
        "    tg.create_task(g())\n"
        "    asyncio.get_running_loop().create_task(g())\n"
    )
    assert loose_tasks(pkg) == ["a.py:4: asyncio.get_running_loop().create_task"]
