"""Fuzzing what cannot be enumerated: schemathesis over the server's own OpenAPI schema, and
hypothesis over the text path (JSON → normalisation → tokenizer → ONNX Runtime) of a real
server. No input may get a 5xx; every answer keeps its shape. `make fuzz` runs more
examples (LMOPS_FUZZ_EXAMPLES) than `make test` does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.faults

EXAMPLES = int(os.environ.get("LMOPS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_no_request_the_schema_allows_gets_a_server_error(served: tuple[str, Path]) -> None:
    """Every operation of /openapi.json, with bodies and parameters schemathesis draws from
    it. (Its pytest plugin's lazy fixture loader fails under pytest 9, so each operation's
    strategy is driven here by hypothesis directly.)"""
    url, _ = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:

        @given(case=operation.as_strategy())
        @FUZZ
        def no_server_error(case: object) -> None:
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.path}: {response.text}"

        no_server_error()


# Any code point, lone surrogates included: JSON can carry them as \\ud800 escapes.
TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=300)


@given(texts=st.lists(TEXT, min_size=1, max_size=8))
@FUZZ
def test_any_texts_are_answered_or_refused_by_index(
    served: tuple[str, Path], texts: list[str]
) -> None:
    url, _ = served
    body = json.dumps({"texts": texts}, ensure_ascii=True)  # escapes what UTF-8 cannot hold
    response = httpx.post(
        f"{url}/v1/predict",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        bad = next(i for i, t in enumerate(texts) if not _utf8(t))
        assert f"text {bad} " in response.json()["error"]
        return
    assert all(_utf8(t) for t in texts)
    predictions = response.json()["predictions"]
    assert len(predictions) == len(texts)
    for prediction in predictions:
        assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-4
        assert prediction["label"] in prediction["probabilities"]


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
