"""The house keeps its floors: a module of a lower stage of the data flow never imports a higher
one, and no two modules import each other (directly or around a circle). Read from the code with
``ast`` (function-level imports included), so the layering stays true as the code grows."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "conformance"
# The stages, lowest first (README "What it does"); shared utilities below them all.
STAGES = ("spec", "reference", "golden", "backends", "judge", "run", "search", "report", "jobs", "cli")
UTILITIES = ("__init__", "errors", "files", "processes", "environment", "locations")
ENTRY_POINTS = ("__main__", "nightly", "pytest_plugin")  # top-level entry points: the CLI's floor


def floor(module: str) -> int:
    """0 for the shared utilities, 1.. for the stages, the CLI's floor for the entry points."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head in UTILITIES:
        return 0
    if head in ENTRY_POINTS:
        return len(STAGES)
    return STAGES.index(head) + 1


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(root: Path) -> dict[str, list[tuple[str, int]]]:
    """Every module of the package under ``root`` → the package modules it imports (and the line)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    found: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        edges = found.setdefault(name, [])
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from .x import y: relative to the package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] == root.name:
                    edges.append((target, node.lineno))
    return found


def layering_violations(root: Path) -> list[str]:
    """``file:line: a imports b (floor x > floor y)`` for every import that runs up the floors."""
    problems = []
    for module, edges in imports(root).items():
        for target, line in edges:
            if floor(target) > floor(module):
                problems.append(f"{module}:{line}: imports {target}, a higher stage "
                                f"({floor(target)} > {floor(module)}; order: {', '.join(STAGES)})")
    return sorted(problems)


def import_cycles(root: Path) -> list[list[str]]:
    """Every circle of module imports (Tarjan's strongly connected components of more than one module)."""
    graph = {m: sorted({t for t, _ in edges}) for m, edges in imports(root).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
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


def test_every_module_has_a_floor() -> None:
    for module in imports(PACKAGE):
        floor(module)  # raises ValueError for a top-level module that is neither a stage nor a utility


def test_no_module_imports_a_higher_stage() -> None:
    assert layering_violations(PACKAGE) == []


def test_no_import_cycles() -> None:
    assert import_cycles(PACKAGE) == []


@pytest.fixture
def copy_of_the_package(tmp_path: Path) -> Path:
    target = tmp_path / "conformance"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_a_planted_upward_import_is_found(copy_of_the_package: Path) -> None:
    case = copy_of_the_package / "spec" / "case.py"
    case.write_text(case.read_text() + "\n\ndef _planted() -> None:\n    from conformance.cli.app import app  # noqa\n")
    found = layering_violations(copy_of_the_package)
    assert len(found) == 1 and found[0].startswith("conformance.spec.case:") and "conformance.cli.app" in found[0]


def test_a_planted_circle_is_found(copy_of_the_package: Path) -> None:
    files = copy_of_the_package / "files.py"
    files.write_text(files.read_text() + "\nfrom conformance import processes  # noqa\n")
    processes = copy_of_the_package / "processes.py"
    processes.write_text(processes.read_text() + "\nfrom conformance import files  # noqa\n")
    assert ["conformance.files", "conformance.processes"] in import_cycles(copy_of_the_package)
