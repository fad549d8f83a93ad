"""No import cycles inside src/modalkv, read statically with `ast` (nothing is imported, so it runs in milliseconds).

Counted: every `import` / `from ... import` of a module of the package, at module level or inside functions (they run
too, later); not counted: those under `if TYPE_CHECKING:` (they never run). `from pkg.x import y` is the module
`pkg.x.y` when that is a module, else `pkg.x`. Importing `pkg.a.b` also runs `pkg.a`'s `__init__`, so that is an
edge too, unless `pkg.a` is an ancestor of the importing module (it ran before the importer did: the top-level
`pkg/__init__.py` is the ancestor of everything, and a package's `__init__` that re-exports its children would
otherwise cycle with each of them). An explicit import of a package (`import pkg.a`, `from pkg.a import name`) is
always an edge.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE = "modalkv"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package_dir` (a package's `__init__.py` is the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run: the bodies of `if TYPE_CHECKING:` are skipped (not their else)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules (of `modules`) that `node` names explicitly."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: from the importer's package, one level up per extra dot
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package that importing (or running a function of) it imports."""
    files = module_files(package_dir, package)
    modules = set(files)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        ancestors = {importer.rsplit(".", depth)[0] for depth in range(1, importer.count(".") + 1)}
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            for target in _targets(node, importer, is_package, modules):
                if target == package or target.startswith(package + "."):
                    parents = {target.rsplit(".", depth)[0] for depth in range(1, target.count(".") + 1)}
                    implicit = parents - ancestors - {package}
                    graph[importer] |= ({target} | implicit) & modules
        graph[importer].discard(importer)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def _shortest_cycle(graph: dict[str, set[str]], start: str, component: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside `component` (breadth-first, ties broken by name)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & component):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: for each strongly connected component of more than one module, the shortest cycle through
    each of its members (a cycle found from several members is listed once, from its first module by name)."""
    cycles = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue  # self-imports are dropped when the graph is built
        seen = set()
        for member in component:
            cycle = _shortest_cycle(graph, member, set(component))
            ring = cycle[:-1]
            turn = ring.index(min(ring))
            canonical = tuple(ring[turn:] + ring[:turn])
            if canonical not in seen:
                seen.add(canonical)
                cycles.append([*canonical, canonical[0]])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(import_graph(SOURCE, PACKAGE))
    if cycles:
        pytest.fail(
            "import cycles in src/modalkv:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles), pytrace=False
        )


def test_checker_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import f\n")  # the top level: no implicit edges to it
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n    return b\n")  # function-level counts
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import g\n")  # re-exports its child: no cycle
    (package / "sub" / "b.py").write_text("from .c import h\n\ndef g():\n    pass\n")
    (package / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.a import f\nelse:\n    import pkg.a\n"
    )
    (package / "d.py").write_text("import typing\n\nif typing.TYPE_CHECKING:\n    import pkg.a\n")
    (package / "e.py").write_text("from pkg import d\n")

    graph = import_graph(package, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub", "pkg.sub.b"},
        "pkg.sub": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a"},  # the else branch runs; the TYPE_CHECKING one does not
        "pkg.d": set(),
        "pkg.e": {"pkg.d"},
    }
    assert find_cycles(graph) == [
        ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"],
        ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c", "pkg.a"],
    ]
    (package / "sub" / "c.py").write_text("def h():\n    pass\n")
    assert find_cycles(import_graph(package, "pkg")) == []
