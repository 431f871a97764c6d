"""The package's layers: no import cycle between mvcom_tf's packages and top-level modules."""

import ast
import collections
import os

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "mvcom_tf")


def unit_of(module: str) -> str:
    """The layer a module belongs to: its subpackage (mvcom_tf.training) or top-level module (mvcom_tf.train)."""
    return ".".join(module.split(".")[:2])


def is_unit(unit: str) -> bool:
    """A subpackage or module of mvcom_tf (not a name imported from the package's __init__)."""
    path = os.path.join(REPO, *unit.split("."))
    return os.path.isdir(path) or os.path.exists(path + ".py")


def import_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports (every import statement, wherever it stands in the file)."""
    graph = collections.defaultdict(set)
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                for target in targets:
                    if target.startswith("mvcom_tf.") and is_unit(unit_of(target)) and \
                            unit_of(target) != unit_of(module):
                        graph[unit_of(module)].add(unit_of(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a list of units (first repeated last), or [] when it has none."""
    state, stack = {}, []

    def visit(unit):
        state[unit] = "open"
        stack.append(unit)
        for target in sorted(graph.get(unit, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[unit] = "done"
        stack.pop()
        return []

    for unit in sorted(graph):
        if unit not in state:
            cycle = visit(unit)
            if cycle:
                return cycle
    return []


def test_no_package_imports_back_up_the_layers():
    graph = import_graph()
    assert "mvcom_tf.stages" in graph["mvcom_tf.train"] and "mvcom_tf.training" in graph["mvcom_tf.stages"]
    assert "mvcom_tf.stages" not in graph["mvcom_tf.training"]  # the loop is handed its builder
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}}) == []
