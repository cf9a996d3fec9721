"""The layers, read from the imports: each module imports only its own layer
and those below it, the protocol knows nothing of Celery, the Celery layer
holds no SQL, and nothing of qmover imports the lab (benchmarks, demo)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qmover"
# Lowest first; a module may import its own layer and any lower one.
LAYERS = ["qmover.errors", "qmover.config", "qmover.pg", "qmover.protocol", "qmover.ops",
          "qmover.runner qmover.tasks", "qmover.cli", "qmover.__main__"]
CELERY_FREE = ("qmover.errors", "qmover.config", "qmover.pg", "qmover.protocol", "qmover.runner")
SQL = re.compile(r"\b(select|insert\s+into|update|delete\s+from|create|execute)\b\s+\S", re.IGNORECASE)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    for n, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer.split()):
            return n
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_layers_are_the_packages_and_every_module_is_in_one():
    assert {module_name(path) for path in MODULES if path.parent != PACKAGE} >= {"qmover.pg", "qmover.protocol"}
    for path in MODULES:
        if module_name(path) != "qmover":
            rank(module_name(path))


def wrong_imports(own: str, imported: list[str]) -> list[str]:
    """What module own may not import among imported."""
    wrong = []
    for name in imported:
        target = next((name.rsplit(".", n)[0] for n in range(name.count(".") + 1)
                       if _is_module(name.rsplit(".", n)[0])), None)
        if name.startswith("qmover_lab"):
            wrong.append(f"{own} imports the lab ({name})")
        elif target not in (None, "qmover") and target.startswith("qmover.") and rank(target) > rank(own):
            wrong.append(f"{own} (layer {rank(own)}) imports {target} (layer {rank(target)})")
        elif own.startswith(CELERY_FREE) and name.startswith(("celery", "kombu")):
            wrong.append(f"{own} imports {name}")
    return wrong


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return ((PACKAGE.parent / relative).with_suffix(".py").exists()
            or (PACKAGE.parent / relative / "__init__.py").exists())


@pytest.mark.parametrize("path", [path for path in MODULES if module_name(path) != "qmover"],
                         ids=lambda path: module_name(path))
def test_a_module_imports_only_its_layer_and_those_below(path):
    assert wrong_imports(module_name(path), imports(path)) == []


def test_the_rule_refuses_an_upward_import_celery_below_the_tasks_and_the_lab():
    assert wrong_imports("qmover.protocol.mover", ["qmover.tasks.jobs", "qmover.tasks.names.MOVE_TASK"]) == [
        "qmover.protocol.mover (layer 3) imports qmover.tasks.jobs (layer 5)",
        "qmover.protocol.mover (layer 3) imports qmover.tasks.names (layer 5)"]
    assert wrong_imports("qmover.pg.db", ["celery"]) == ["qmover.pg.db imports celery"]
    assert wrong_imports("qmover.cli", ["qmover_lab.bench"]) == ["qmover.cli imports the lab (qmover_lab.bench)"]
    assert wrong_imports("qmover.tasks.jobs", ["qmover.protocol.mover.Mover", "celery"]) == []


def test_the_celery_layer_holds_no_sql():
    for path in sorted((PACKAGE / "tasks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not SQL.match(node.value.strip()), f"{path.name}: SQL {node.value[:60]!r}"
        assert not any(name.startswith("qmover.pg.queries") for name in imports(path)), path.name
