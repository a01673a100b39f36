"""No import cycle among the project's modules, counting the imports made only for type
checking (``if TYPE_CHECKING:``) and inside functions: read from the source with ``ast``."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "shared", "tools", "tests")


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, source] if source else base)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {module for module in found if module in modules and module != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of ``graph``, each found and then broken at its last edge until none is left."""
    graph = {name: set(edges) for name, edges in graph.items()}
    cycles = []
    while True:
        try:
            tuple(graphlib.TopologicalSorter(graph).static_order())
            return cycles
        except graphlib.CycleError as error:
            cycle: list[str] = error.args[1]
            cycles.append(cycle[::-1])  # graphlib lists it against the import direction
            graph[cycle[1]].discard(cycle[0])


def test_every_kind_of_import_is_an_edge(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import pkg.a\n"
        "from pkg import b\n"
        "from pkg.c import name\n"
        "from . import d\n"
        "if TYPE_CHECKING:\n    from pkg.e import Thing\n"
        "def later() -> None:\n    import pkg.f\n"
    )
    modules = {name: source for name in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e")}
    modules |= {"pkg.f": source, "pkg.mod": source}
    edges = {"pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.f"}
    assert _imports("pkg.mod", source, modules) == edges
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        [["a", "b", "c", "a"]],
        [["b", "c", "a", "b"]],
        [["c", "a", "b", "c"]],
    )


def test_there_is_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert {"shared.bus", "shared.settings"} <= graph["shared.service"]  # the graph is read
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _home(module: str) -> str:
    """``services.<name>`` for a service's module, else its top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" else parts[0]


def test_a_service_imports_only_itself_and_shared() -> None:
    modules = _modules()
    for name, path in modules.items():
        if _home(name) in ("tools", "tests"):
            continue
        strays = {
            m for m in _imports(name, path, modules) if _home(m) not in {_home(name), "shared"}
        }
        assert not strays, f"{name} imports {sorted(strays)}"
