"""Every third-party package the installed code imports is declared in pyproject.toml, so
a fresh install has it (not only because something else happened to bring it)."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions

from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT

PACKAGES = ("lmops", "tasks", "flows", "serving")


def _imported_top_level_names() -> dict[str, str]:
    """Top-level module name -> one file importing it, over the installed packages."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO_ROOT)))
    return found


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_every_third_party_import_is_declared() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    declared = {_normalise(Requirement(r).name) for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "dev":  # an extra the code names where it needs it
            declared |= {_normalise(Requirement(r).name) for r in requirements}
    distributions = packages_distributions()
    undeclared = {}
    for name, where in _imported_top_level_names().items():
        if name in sys.stdlib_module_names or name in PACKAGES or name == "__future__":
            continue
        if name == "triton_python_backend_utils":  # Triton's own, inside its Python backend
            continue
        providers = {_normalise(d) for d in distributions.get(name, [name])}
        if not providers & declared:
            undeclared[name] = (sorted(providers), where)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_builtin_base_ships_in_a_declared_package() -> None:
    """Builtin bases are read from their package's files, not imported: the scan above
    cannot see them."""
    from lmops.bases import BUILTIN_BASES

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    declared = {_normalise(Requirement(r).name) for r in project["dependencies"]}
    assert {_normalise(base.package) for base in BUILTIN_BASES.values()} <= declared
