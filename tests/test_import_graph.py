"""The package's import graph: dependencies run one way, core (`deleaker`) <- plugins <- export <- engines <- runtime
<- CLI (`deleaker.runtime.cli`), and no module imports itself back through others.

Read from the sources with `ast`, so imports inside functions and under ``TYPE_CHECKING`` count as much as the ones
at the top of a module (a function-level import only hides a dependency; it does not remove it), and so do
``importlib.import_module("deleaker...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Import name -> source folder (pyproject's package-dir), lowest layer first.
PACKAGES = {
    "deleaker": ROOT / "deleaker",
    "deleaker.plugins": ROOT / "plugins",
    "deleaker.export": ROOT / "export",
    "deleaker.engines": ROOT / "engines",
    "deleaker.runtime": ROOT / "runtime",
}
#: The layers, lowest first: a module may import its own layer and the ones before it.
LAYERS = ("core", "plugins", "export", "engines", "runtime", "cli")

def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            names = [p for p in parts if p != "__init__"]
            modules[".".join([package, *names])] = path
    return modules


MODULES = _modules()


def layer(module: str) -> str:
    if module == "deleaker.runtime.cli" or module.startswith("deleaker.runtime.cli."):
        return "cli"
    for package in reversed(PACKAGES):
        if package != "deleaker" and (module == package or module.startswith(package + ".")):
            return package.split(".")[1]
    return "core"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """The module of ours that ``name`` (a module or a name inside one) is, else None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every module of ours that ``module`` imports, wherever in the file the import is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            if target.startswith("deleaker") and (known := _known(target)) is not None and known != module:
                found.add(known)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_graph_sees_every_layer_and_function_level_imports():
    """The reader finds what it must: modules in every layer, and imports that sit inside functions."""
    assert {layer(m) for m in MODULES} == set(LAYERS)
    assert "deleaker.runtime.engine_dir" in GRAPH["deleaker.runtime.runtime"]  # inside from_engines
    assert "deleaker.export.ort_session" in GRAPH["deleaker.runtime.backends"]  # importlib.import_module


def test_dependencies_run_one_way():
    upward = sorted(
        (module, target)
        for module, targets in GRAPH.items()
        for target in targets
        if LAYERS.index(layer(target)) > LAYERS.index(layer(module))
    )
    assert not upward, "imports against the layers (core <- plugins <- export <- engines <- runtime <- cli):\n" + (
        "\n".join(f"  {a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in upward)
    )


def test_no_module_imports_itself_back():
    """No cycle at all, within a layer included (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
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
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", ["deleaker.engines.build", "deleaker.runtime.engine_dir"])
def test_a_planted_import_would_be_seen(module, tmp_path, monkeypatch):
    """The check is not vacuous: an upward import hidden in a function is an edge of the graph."""
    planted = tmp_path / "planted.py"
    planted.write_text(MODULES[module].read_text() + "\n\ndef _hidden():\n    from deleaker.runtime.cli import main\n")
    monkeypatch.setitem(MODULES, module, planted)
    assert "deleaker.runtime.cli" in imports_of(module)
