"""The package's layout: data flows one way, and modules keep their private names to themselves.

Every import counts, including those inside functions and under
``TYPE_CHECKING``: a function-level import that closes a loop is still a
loop in the design, only hidden from the interpreter.
"""
from __future__ import annotations

import ast
import pathlib
import textwrap

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "websauna_tasks"


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imports(root: pathlib.Path) -> list[tuple[str, str, str]]:
    """(importer, imported module, name) for every ``from ... import`` of the package's own modules."""
    files = module_files(root)
    found = []
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(root.name):
                target = node.module
            else:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((module, submodule if submodule in files else target, alias.name))
    return found


def cycles(root: pathlib.Path) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (the package's face aside)."""
    graph: dict[str, set[str]] = {module: set() for module in module_files(root)}
    for importer, imported, _name in imports(root):
        if imported in graph and imported != importer and imported != root.name:
            graph[importer].add(imported)
    # Tarjan's strongly connected components, iteratively: no recursion limit to meet.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def private_imports(root: pathlib.Path) -> list[str]:
    return [f"{importer} imports {name} from {imported}" for importer, imported, name in imports(root)
            if name.startswith("_") and not name.startswith("__")]


def test_no_module_of_the_package_imports_in_a_loop():
    assert cycles(PACKAGE) == []


def test_no_private_name_is_imported_from_another_module():
    assert private_imports(PACKAGE) == []


def write_tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return package


def test_the_checks_see_loops_through_functions_type_checking_and_subpackages(tmp_path):
    package = write_tree(tmp_path, {
        "a.py": "from .b import thing\n",
        "b.py": "import typing as t\nif t.TYPE_CHECKING:\n    from .sub.c import Other\n",
        "sub/__init__.py": "",
        "sub/c.py": "def late():\n    from ..a import thing\n",
        "d.py": "from .a import thing\n",
        "e.py": "from .d import _hidden\nfrom pkg.a import thing\n",
    })
    assert cycles(package) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert private_imports(package) == ["pkg.e imports _hidden from pkg.d"]


def test_a_package_face_that_hands_names_on_is_no_loop(tmp_path):
    package = write_tree(tmp_path, {
        "__init__.py": "from .a import thing\n",
        "a.py": "from . import b\n",
        "b.py": "X = 1\n",
        "sub/__init__.py": "from ._private_module import public\n",
        "sub/_private_module.py": "from ..b import X\n",
    })
    assert cycles(package) == []
    assert private_imports(package) == []
