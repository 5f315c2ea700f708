"""dvc.yaml and the code agree: every stage declares the data it reads, the outputs it
writes, and the project code it runs, so a change to any of them re-runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from lmops import stages
from lmops.tasks.stages import STAGES
from tests.conftest import REPO_ROOT

DVC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text("utf-8"))["stages"]
# Parsing params, naming errors and writing files atomically change no stage's result.
INFRASTRUCTURE = {"lmops/config.py", "lmops/errors.py", "lmops/atomic.py"}


def _paths(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def _project_imports(path: Path) -> set[str]:
    """Project modules imported anywhere in `path` (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            # lmops.tasks.x lives in tasks/x.py (pyproject's package-dir), lmops.x in lmops/.
            parts = name.split(".")
            if parts[:2] == ["lmops", "tasks"]:
                parts = parts[1:]
            module = Path("/".join(parts) + ".py")
            if parts[0] in ("lmops", "tasks") and (REPO_ROOT / module).is_file():
                found.add(module.as_posix())
    return found


def _code_closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_project_imports(REPO_ROOT / current))
    return seen - INFRASTRUCTURE


def test_every_stage_is_in_every_table() -> None:
    tables = (list(STAGES), list(stages.READS), list(stages.WRITES))
    assert list(DVC) == list(stages.PIPELINE) and all(t == list(DVC) for t in tables)


@pytest.mark.parametrize("stage", list(stages.PIPELINE))
def test_dvc_declares_the_data_each_stage_reads_and_writes(stage: str) -> None:
    entry = DVC[stage]
    data_deps = {d for d in _paths(entry["deps"]) if not d.endswith(".py")}
    assert data_deps == {p.as_posix() for p in stages.READS[stage]}
    outs = _paths(entry.get("outs", [])) | _paths(entry.get("metrics", []))
    written = stages.WRITES[stage] + [stages.cost_path(stage)]
    assert outs == {p.as_posix() for p in written}


@pytest.mark.parametrize("stage", list(stages.PIPELINE))
def test_each_stage_function_uses_only_its_declared_paths(stage: str) -> None:
    source = ast.parse((REPO_ROOT / "tasks" / "stages.py").read_text("utf-8"))
    (function,) = [
        n for n in source.body if isinstance(n, ast.FunctionDef) and n.name == f"_{stage}"
    ]
    constants = {
        name for name, value in vars(stages).items() if isinstance(value, Path) and name.isupper()
    }
    used = {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and n.id in constants}
    declared = stages.READS[stage] + stages.WRITES[stage] + stages.UNTRACKED.get(stage, [])
    assert {getattr(stages, name) for name in used} <= set(declared)
    assert set(stages.WRITES[stage]) <= {getattr(stages, name) for name in used}


@pytest.mark.parametrize("stage", list(stages.PIPELINE))
def test_dvc_declares_the_code_each_stage_runs(stage: str) -> None:
    code_deps = {d for d in _paths(DVC[stage]["deps"]) if d.endswith(".py")}
    missing = _code_closure(f"tasks/{stage}.py") - code_deps
    assert not missing, f"dvc.yaml's {stage} stage runs {sorted(missing)} but does not list them"
