"""The project's modules import one way: no cycle among them, and each imports on its own."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "export", "runtime", "modeldir", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "_pb2" not in p.name
    }


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (relative imports resolved; ``from a import b``
    points at the module ``a.b`` when there is one, else at ``a``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_project_modules():
    graph = import_graph()
    assert graph["trainer.fit"] and graph["trainer.merging.adamerging"]  # the graph is real
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_runtime_never_imports_the_trainer_or_export():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(("runtime", "modeldir")):
            bad = [t for t in targets if t.startswith(("trainer", "export", "bench"))]
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("package", ["trainer", "export", "modeldir"])
def test_every_module_imports_on_its_own(package):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        if not info.name.endswith("__main__"):  # __main__ runs the command
            importlib.import_module(info.name)
