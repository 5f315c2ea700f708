"""Every test is in exactly one family — code, data, model, faults or e2e — so that
`make test-fast` and `make test-<family>` between them leave nothing out and run nothing
twice. The family is the folder's (tests/conftest.py) unless a test names its own."""

from __future__ import annotations

import pytest

from tests.conftest import COLLECTED_FAMILIES, FAMILIES


def family_errors(collected: dict[str, list[str]]) -> list[str]:
    """One line for each test whose families are not exactly one."""
    return [
        f"{test}: {', '.join(names) or 'no family'} (exactly one of {', '.join(FAMILIES)})"
        for test, names in collected.items()
        if len(names) != 1
    ]


def test_every_collected_test_has_exactly_one_family(request: pytest.FixtureRequest) -> None:
    """Covers what this run collected, `-m` or not: all of tests/ under `make test`."""
    assert family_errors(request.config.stash[COLLECTED_FAMILIES]) == []


def test_a_test_with_no_family_or_two_is_named() -> None:
    errors = family_errors({"a.py::t": ["code"], "b.py::t": [], "c.py::t": ["data", "model"]})
    assert [error.split(" (")[0] for error in errors] == [
        "b.py::t: no family",
        "c.py::t: data, model",
    ]
