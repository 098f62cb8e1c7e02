"""The layering of the code: a library (train/core/) under two apps (train/ and analysis/).

Every import of the project's own modules is read from the source (top-level and inside
functions alike), so a lazy import breaks the layering as surely as one at the top:

* the library imports neither app;
* training's app never imports the analysis app, and the analysis app imports only the library;
* scripts import no tests;
* no module uses another module's private names (`_name`)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("train", "analysis", "tests", "scripts")


def layer(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("train/core/"):
        return "library"
    return {"train": "training app", "analysis": "analysis app", "scripts": "scripts", "tests": "tests"}[rel.split("/")[0]]


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_layer(name: str) -> str | None:
    """The layer of a project module by its dotted name (None for other packages)."""
    top = name.split(".")[0]
    if top not in PROJECT:
        return None
    if name == "train.core" or name.startswith("train.core."):
        return "library"
    return {"train": "training app", "analysis": "analysis app", "scripts": "scripts", "tests": "tests"}[top]


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [a.name for a in node.names]
            found.append((base, names, node.lineno))
            # `from train import loop` imports the module train.loop
            found += [(f"{base}.{n}", [], node.lineno) for n in names if module_layer(f"{base}.{n}")
                      and (ROOT / Path(*f"{base}.{n}".split("."))).with_suffix(".py").exists()]
    return found


SOURCES = sorted(p for top in ("train", "analysis", "scripts") for p in (ROOT / top).rglob("*.py"))
ALLOWED = {  # what each layer may import of the project
    "library": {"library"},
    "training app": {"library", "training app"},
    "analysis app": {"library", "analysis app"},
    "scripts": {"library", "training app", "analysis app", "scripts"},
}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_module_imports_only_the_layers_below_it(path):
    mine = layer(path)
    wrong = [f"line {line}: {name} ({module_layer(name)})" for name, _, line in imports(path)
             if module_layer(name) is not None and module_layer(name) not in ALLOWED[mine]]
    assert not wrong, f"{path.relative_to(ROOT)} ({mine}) imports " + "; ".join(wrong)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_uses_another_modules_private_names(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    project_aliases = {}
    wrong = []
    for name, names, line in imports(path):
        if module_layer(name) is None:
            continue
        wrong += [f"line {line}: from {name} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and module_layer(node.module or "x"):
            for a in node.names:
                if module_layer(f"{node.module}.{a.name}"):
                    project_aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if module_layer(a.name) and a.asname:
                    project_aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in project_aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            wrong.append(f"line {node.lineno}: {project_aliases[node.value.id]}.{node.attr}")
    assert not wrong, f"{path.relative_to(ROOT)} uses private names of other modules: " + "; ".join(wrong)


def test_the_checker_sees_lazy_imports_and_private_names(tmp_path, monkeypatch):
    """The checks above cannot pass by reading nothing: a function-level import of an app module
    and a private name are found in a planted library file."""
    planted = ROOT / "train" / "core" / "_planted_for_test.py"
    planted.write_text("def f():\n    from analysis import report\n    from train.core.phase import _x\n"
                       "    from train.core import names as N\n    return N._HEAD\n", encoding="utf-8")
    try:
        found = imports(planted)
        assert ("analysis.report", [], 2) in found
        with pytest.raises(AssertionError, match="analysis.report"):
            test_each_module_imports_only_the_layers_below_it(planted)
        with pytest.raises(AssertionError, match=r"import _x.*names\._HEAD"):
            test_no_module_uses_another_modules_private_names(planted)
    finally:
        planted.unlink()


def test_no_two_modules_import_each_other_in_a_loop():
    """The modules' imports (lazy ones included) form no cycle: each layer reads top to bottom."""
    modules = {module_of(p): p for p in SOURCES}
    graph = {name: sorted({m for m, _, _ in imports(path) if m in modules and m != name})
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for nxt in graph[name]:
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [name, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[name] = 2
        return None

    for name in graph:
        if name not in state:
            cycle = visit(name, [name])
            assert cycle is None, " -> ".join(cycle)
