"""Joining delayed labels to the traffic log (lmops/feedback.py) on hand-written logs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from lmops import feedback
from lmops.artifacts import traffic_file_name
from tests.conftest import traffic_record


def _log(folder: Path, when: datetime, rows: list[tuple[str, str, str]]) -> None:
    """(request id, text, served label) rows into the hour's file."""
    folder.mkdir(exist_ok=True)
    with (folder / traffic_file_name(when)).open("a", encoding="utf-8") as handle:
        for rid, text, label in rows:
            handle.write(traffic_record(text, when, request_id=rid, label=label) + "\n")


def test_a_reused_id_labels_its_newest_request(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    _log(tmp_path, now - timedelta(hours=2), [("a", "old one", "positive"), ("b", "x", "positive")])
    _log(tmp_path, now, [("a", "new one", "negative"), ("a", "new two", "negative")])
    found = feedback.find_requests(tmp_path, {"a", "b", "missing"})
    assert [r.text for r in found["a"]] == ["new one", "new two"]
    assert [r.text for r in found["b"]] == ["x"] and "missing" not in found


def test_realized_accuracy_matches_each_text_to_its_label() -> None:
    ids = ["a", "b", "a", None, "c"]
    served = ["positive", "negative", "negative", "positive", "positive"]
    given = {"a": ["positive", "positive"], "b": ["negative"]}
    # a: right then wrong; b: right; the unlabelled and id-less rows do not count.
    assert feedback.realized(ids, served, given) == (3, 2 / 3)
    assert feedback.realized(ids, served, {}) == (0, None)


def test_realized_accuracy_per_version_of_a_canary_window() -> None:
    # prod answered a (2 texts) and b; the canary answered c (2 texts).
    ids = ["a", "c", "a", "b", "c"]
    served = ["positive", "negative", "negative", "negative", "negative"]
    versions = ["v1", "v2", "v1", "v1", "v2"]
    given = {"a": ["positive", "positive"], "b": ["negative"], "c": ["negative", "positive"]}
    assert feedback.realized_by_version(ids, served, versions, given) == {
        "v1": (3, 2 / 3),
        "v2": (2, 1 / 2),
    }


def test_the_newest_feedback_for_an_id_wins_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    _log(tmp_path, datetime.now(UTC), [("a", "t", "positive")])
    for labels in (["negative"], ["positive"]):
        (verdict,) = feedback.submit(tmp_path, [("a", labels)], ["negative", "positive"], "api")
        assert verdict.status == 200
    with (tmp_path / feedback.FEEDBACK_FILE).open("a", encoding="utf-8") as handle:
        handle.write('{"received_at": "2026-')  # a write cut short by a crash
    assert feedback.labels_by_request(tmp_path) == {"a": ["positive"]}
    assert [(t.text, t.label) for t in feedback.labelled_traffic(tmp_path)] == [("t", "positive")]
    # The next feedback after the crash starts on its own line and is read.
    feedback.submit(tmp_path, [("a", ["negative"])], ["negative", "positive"], "file")
    assert feedback.labels_by_request(tmp_path) == {"a": ["negative"]}
