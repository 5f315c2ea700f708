"""Layers only look down: the core (`lmops/`, less the CLI on top) imports nothing from
`flows/`, `tasks/` or `serving/`; tasks and serving depend only on the core; flows on tasks
and the core. Function-local imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# What each layer may import from the project's packages.
ALLOWED = {
    "lmops": {"lmops"},
    "tasks": {"lmops", "tasks"},
    "serving": {"lmops", "serving"},
    "flows": {"lmops", "tasks", "flows"},
}
# The composition root: the `lmops` command wires every layer together.
ON_TOP = {"lmops/cli.py", "lmops/__main__.py"}


def _project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & set(ALLOWED)


MODULES = [
    path.relative_to(REPO_ROOT).as_posix()
    for layer in ALLOWED
    for path in sorted((REPO_ROOT / layer).rglob("*.py"))
]


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_only_its_layer_and_below(module: str) -> None:
    if module in ON_TOP:
        return
    layer = module.split("/")[0]
    upward = _project_imports(REPO_ROOT / module) - ALLOWED[layer]
    assert not upward, f"{module} ({layer}) imports {sorted(upward)}, a layer above it"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from serving.app import create_app\n", "utf-8")
    assert _project_imports(sneaky) == {"serving"}
