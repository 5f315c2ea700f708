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


def layer_of(module: str) -> str:
    """The layer of an imported module name: lmops.tasks.x is in tasks, lmops.x in the core."""
    parts = module.split(".")
    if parts[0] == "lmops" and len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return parts[0]


def _project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(layer_of(node.module))
            if node.module == "lmops":  # `from lmops import tasks`
                found.update(layer_of(f"lmops.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(layer_of(alias.name) for alias in node.names)
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
    sneaky.write_text("def f():\n    from lmops.serving.app import create_app\n", "utf-8")
    assert _project_imports(sneaky) == {"serving"}


# Files a module writes and reads itself, or input that is not a project file; everything
# else that crosses a stage or process boundary is read through lmops/artifacts.py.
PRIVATE_JSON = {
    "lmops/artifacts.py": "the seam itself",
    "lmops/classifier.py": "classifier.json, written and read by save/load here",
    "lmops/trainloop.py": "DVCLive's own summary, checked for a write cut short by a kill",
    "tasks/pretrain.py": "the resume state of its own checkpoints",
    "tasks/triton_tokenizer.py": "Triton's model_config argument",
    "flows/monitoring.py": "last_trigger.json, written and read by the cooldown here",
    "serving/protocol.py": "request bodies of the binary tensor extension",
    "bench/monitor.py": "the JSON line its own child process prints",
    "lmops/experiments.py": "`dvc exp show --json`, and the finetune stage metrics",
    # Stage metrics (reports/pretrain.json, finetune.json) are not typed yet.
    "bench/recipes.py": "its own recipes.json, and the pretrain and finetune stage metrics",
}
JSON_READERS = {"load", "loads", "read_json"}


def _json_reads(path: Path) -> list[int]:
    """Lines calling json.load/json.loads/pd.read_json (or `from json import loads`)."""
    tree = ast.parse(path.read_text("utf-8"))
    bare = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "json"
        for alias in node.names
        if alias.name in JSON_READERS
    }
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in JSON_READERS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "json"
            )
            or (isinstance(node.func, ast.Name) and node.func.id in bare)
        )
    ]


@pytest.mark.parametrize(
    "module",
    [
        *MODULES,
        *(
            path.relative_to(REPO_ROOT).as_posix()
            for path in sorted((REPO_ROOT / "bench").glob("*.py"))
        ),
    ],
)
def test_no_module_parses_another_modules_file_by_hand(module: str) -> None:
    if module in PRIVATE_JSON:
        return
    lines = _json_reads(REPO_ROOT / module)
    assert not lines, (
        f"{module} parses JSON by hand at line(s) {lines}: read the file through its model "
        "in lmops/artifacts.py (or list a module-private format in PRIVATE_JSON)"
    )


def test_the_parse_check_sees_a_hand_parser(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "import json\nfrom json import loads as l\n"
        "a = json.loads('{}')\nb = l('{}')\nc = json.dumps({})\n",
        "utf-8",
    )
    assert _json_reads(sneaky) == [3, 4]
