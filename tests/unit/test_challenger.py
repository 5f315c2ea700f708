"""The challenger's judgements on figures computed by hand: when a canary is switched off,
and what the live promotion gates make of the shadow log."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from lmops.artifacts import ShadowRecord, traffic_file_name, traffic_files
from lmops.config import CanaryConfig, LiveEvidenceConfig
from lmops.serving.challenger import CanaryJudge, _Outcome
from lmops.stats import paired_mean_interval
from lmops.tasks.promote import live_evidence, live_gates

CANARY = CanaryConfig(
    share=0.5, min_requests=4, window=10, max_error_rate_increase=0.1, max_latency_ratio=1.5
)
LIVE = LiveEvidenceConfig(
    required=True, min_texts=4, min_agreement=0.75, estimated_accuracy_margin=0.01
)


def _judge(prod: list[tuple[bool, float]], canary: list[tuple[bool, float]]) -> str | None:
    judge = CanaryJudge(CANARY)
    for ok, ms in prod:
        assert judge.record("prod", ok, ms) is None  # prod's own requests never decide
    verdicts = [judge.record("canary", ok, ms) for ok, ms in canary]
    assert all(v is None for v in verdicts[:-1])  # only the last record can decide
    return judge.switched_off


def test_a_canary_is_judged_only_after_min_requests() -> None:
    # Three failures out of three: not yet judged (min_requests 4).
    assert _judge([(True, 1.0)] * 10, [(False, 1.0)] * 3) is None


def test_a_canary_failing_more_than_prod_beyond_the_limit_is_switched_off() -> None:
    # 1 of 4 = 25% against prod's 10% + 10%: off, and the reason names both rates.
    reason = _judge([(True, 1.0)] * 9 + [(False, 1.0)], [(True, 1.0)] * 3 + [(False, 1.0)])
    assert reason is not None and reason.startswith("error rate 25.0% over its last 4")
    assert "prod's 10.0%" in reason and "max_error_rate_increase=0.1" in reason
    # 1 of 5 = 20%: within 10% + 10%, stays on.
    assert _judge([(True, 1.0)] * 9 + [(False, 1.0)], [(True, 1.0)] * 4 + [(False, 1.0)]) is None


def test_a_canary_slower_than_the_ratio_is_switched_off() -> None:
    # Medians 3.2 ms against 2.0 ms: 1.6x > 1.5x. At 2.9 ms (1.45x) it stays on.
    slow = _judge([(True, 2.0)] * 5, [(True, 3.2)] * 4)
    assert slow is not None and "median latency 3.20 ms, 1.60x prod's 2.00 ms" in slow
    assert _judge([(True, 2.0)] * 5, [(True, 2.9)] * 4) is None


def test_the_judge_looks_at_the_last_window_only() -> None:
    judge = CanaryJudge(CANARY)
    judge.sides["prod"].extend(_Outcome(True, 1.0) for _ in range(10))
    # Three early failures, then ten answers: the window of 10 holds the answers only.
    judge.sides["canary"].extend(_Outcome(ok, 1.0) for ok in [False] * 3 + [True] * 10)
    assert judge.verdict() is None
    judge.sides["canary"].extend(_Outcome(False, 1.0) for _ in range(2))
    assert judge.verdict() is not None  # 2 of the last 10: 20% > 0% + 10%


def _write_shadow(folder: Path, rows: list[tuple[str, float, str, float]], **ids: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    with (folder / traffic_file_name(now, kind="shadow")).open("a", encoding="utf-8") as out:
        for n, (prod_label, prod_score, label, score) in enumerate(rows):
            record = ShadowRecord(
                timestamp=now,
                request_id=f"r{n}",
                index=0,
                prod_version=ids.get("prod", "v1"),
                prod_label=prod_label,
                prod_score=prod_score,
                prod_latency_ms=2.0 + n,
                challenger_version=ids.get("challenger", "v2"),
                challenger_label=label,
                challenger_score=score,
                challenger_latency_ms=1.0 + n,
            )
            out.write(record.line() + "\n")
        out.write('{"torn": \n')  # a write cut short is skipped


def test_live_evidence_and_gates_by_hand(tmp_path: Path) -> None:
    rows = [
        ("positive", 0.9, "positive", 0.95),
        ("negative", 0.8, "negative", 0.85),
        ("positive", 0.7, "negative", 0.6),
        ("negative", 0.9, "negative", 0.9),
    ]
    _write_shadow(tmp_path, rows)
    _write_shadow(tmp_path, rows[:1], challenger="v3")  # another challenger: not counted
    assert len(traffic_files(tmp_path, kind="shadow")) == 1 and traffic_files(tmp_path) == []

    evidence = live_evidence(tmp_path, "v1", "v2", 0.95)
    assert evidence["texts"] == 4 and evidence["agreement"] == 0.75
    assert evidence["estimated_accuracy"] == {"prod": 0.825, "challenger": 0.825}
    # Differences +0.05, +0.05, -0.1, 0: mean 0, sd sqrt(0.015/3), half-width 1.96 sd / 2.
    half = 1.959964 * math.sqrt(0.015 / 3) / 2
    assert evidence["paired"]["difference"] == pytest.approx(0.0, abs=1e-9)
    assert evidence["paired"]["ci_low"] == pytest.approx(-half, abs=1e-5)
    assert evidence["median_latency_ms"] == {"prod": 3.5, "challenger": 2.5}

    gates = {g["gate"]: g for g in live_gates(evidence, LIVE)}
    assert gates["live_shadow_texts"]["passed"] and gates["live_agreement"]["passed"]
    # The interval reaches 6.9 points below prod: beyond the 1-point margin, refused.
    assert not gates["live_estimated_accuracy"]["passed"]
    assert gates["live_estimated_accuracy"]["paired"]["rule"] == "non_inferiority"
    wide = LiveEvidenceConfig(**{**LIVE.model_dump(), "estimated_accuracy_margin": 0.07})
    assert all(g["passed"] for g in live_gates(evidence, wide))


def test_no_shadow_evidence_fails_every_live_gate_and_says_how_to_get_it(tmp_path: Path) -> None:
    evidence = live_evidence(tmp_path / "missing", "v1", "v2", 0.95)
    gates = live_gates(evidence, LIVE)
    assert [g["passed"] for g in gates] == [False, False, False]
    assert "--challenger staging" in gates[0]["note"]


def test_paired_mean_interval_of_one_text_is_unbounded() -> None:
    mean, low, high = paired_mean_interval(np.array([0.1]), 0.95)
    assert mean == 0.1 and low == -math.inf and high == math.inf


def test_a_shadow_log_that_cannot_be_written_is_counted_and_recovers(tmp_path: Path) -> None:
    """The shadow log fails as the traffic log does: a folder that is a file is counted,
    never raised, and writing resumes once the folder can be made."""
    from lmops.engine import Prediction
    from lmops.serving.traffic import ShadowedRequest, ShadowLog

    folder = tmp_path / "traffic"
    folder.write_text("not a folder", "utf-8")
    errors: list[str] = []
    log = ShadowLog(folder, rotate_mb=1, on_error=errors.append)
    answer = Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}, "v1")
    shadowed = ShadowedRequest(
        datetime.now(UTC),
        "r0",
        [answer],
        3.0,
        "v2",
        ["negative", "positive"],
        np.array([[0.7, 0.3]]),
        1.5,
    )
    log.append_shadowed(shadowed)
    log.flush()
    assert errors == ["write"] and log.degraded is not None

    folder.unlink()
    log.append_shadowed(shadowed)
    log.flush()
    log.close()
    assert log.degraded is None
    (path,) = traffic_files(folder, kind="shadow")
    (record,) = [ShadowRecord.from_line(line) for line in path.read_text("utf-8").splitlines()]
    assert (record.prod_label, record.challenger_label, record.challenger_score) == (
        "positive",
        "negative",
        0.7,
    )
