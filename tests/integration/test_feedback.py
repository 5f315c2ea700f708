"""Delayed labels against a real `lmops serve` (tiny export): POST /v1/feedback and
`lmops feedback FILE` join true labels to the traffic log by request id, refuse what does
not fit with a status per id, and the monitor reports the realized accuracy; the labelled
traffic exports as a CSV that data.source reads."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from lmops import feedback
from lmops.config import override, read_raw
from lmops.sources import read_labelled
from tests.conftest import run_lmops, serve, serving_workspace, stop_server


@pytest.fixture(scope="module")
def workspace(
    tiny_export: Callable[[int], Path],
    tiny_validated: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, str, pd.DataFrame]]:
    """A served tiny model with its reference data, and 60 labelled held-out texts sent
    to it as 30 requests of two (ids fb-0 … fb-29)."""
    root = serving_workspace(tiny_export, tmp_path_factory.mktemp("feedback"))
    raw = override(read_raw(root), {"monitor.min_rows": 50})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), "utf-8")
    (root / "data" / "validated").mkdir(parents=True)
    for split in ("test", "val"):
        shutil.copy(tiny_validated / f"{split}.parquet", root / "data" / "validated")
    texts = pd.read_parquet(tiny_validated / "test.parquet").head(60).reset_index(drop=True)
    url, server = serve(root)
    served = []
    for n in range(30):
        pair = texts["text"][2 * n : 2 * n + 2].tolist()
        answer = httpx.post(
            f"{url}/v1/predict", json={"texts": pair}, headers={"x-request-id": f"fb-{n}"}
        )
        answer.raise_for_status()
        served += [p["label"] for p in answer.json()["predictions"]]
    texts["served"] = served
    deadline = time.monotonic() + 10  # the log is written by its own thread
    while len(feedback.find_requests(root / "data" / "traffic", {"fb-29"})) < 1:
        assert time.monotonic() < deadline, "the traffic log never got the requests"
        time.sleep(0.2)
    yield root, url, texts
    stop_server(server)


def lmops(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_lmops(root, *args, timeout=300)


def _labels(texts: pd.DataFrame, n: int) -> list[str]:
    return texts["label"][2 * n : 2 * n + 2].astype(str).tolist()


def test_feedback_is_stored_or_refused_with_a_reason_per_id(
    workspace: tuple[Path, str, pd.DataFrame],
) -> None:
    root, url, texts = workspace

    def post(body: Any) -> httpx.Response:
        return httpx.post(f"{url}/v1/feedback", json=body)

    stored = post({"request_id": "fb-0", "labels": _labels(texts, 0)})
    assert stored.status_code == 200 and stored.json() == {"request_id": "fb-0", "stored": 2}
    unknown = post({"request_id": "nope", "labels": ["positive"]})
    assert unknown.status_code == 404 and "no request 'nope' in the traffic log" in unknown.text
    short = post({"request_id": "fb-1", "labels": ["positive"]})
    assert short.status_code == 422 and "had 2 text(s), got 1 labels" in short.text
    strange = post({"request_id": "fb-1", "labels": ["positive", "meh"]})
    assert strange.status_code == 422 and "unknown label(s) ['meh']" in strange.text
    assert post({"request_id": "fb-1"}).status_code == 422
    assert post({"request_id": "x" * 500, "labels": ["positive"]}).status_code == 400
    # Only the accepted item reached the file.
    assert feedback.labels_by_request(root / "data" / "traffic") == {"fb-0": _labels(texts, 0)}


def test_cli_feedback_keeps_the_good_ids_and_names_the_bad(
    workspace: tuple[Path, str, pd.DataFrame], tmp_path: Path
) -> None:
    root, _, texts = workspace
    lines = [{"request_id": f"fb-{n}", "labels": _labels(texts, n)} for n in range(1, 30)]
    lines.append({"request_id": "ghost", "labels": ["positive"]})
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), "utf-8")
    result = lmops(root, "feedback", str(path))
    assert result.returncode == 1
    assert "stored 29 of 30 request(s)' labels" in result.stdout
    assert "404 ghost: no request 'ghost' in the traffic log" in result.stderr
    assert len(feedback.labels_by_request(root / "data" / "traffic")) == 30

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"request_id": "fb-1"}\n', "utf-8")
    refused = lmops(root, "feedback", str(broken))
    assert refused.returncode == 1 and 'broken.jsonl:1: not {"request_id"' in refused.stderr


def test_monitor_reports_realized_accuracy_beside_the_estimate(
    workspace: tuple[Path, str, pd.DataFrame],
) -> None:
    root, _, texts = workspace
    result = lmops(root, "monitor", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    performance = json.loads(result.stdout)["performance"]
    truth = (texts["served"] == texts["label"].astype(str)).mean()
    assert performance["labelled_rows"] == 60
    assert performance["realized_accuracy"] == pytest.approx(truth, abs=1e-5)
    plain = lmops(root, "monitor")
    assert f"realized on 60 labelled texts: {truth:.4f}" in plain.stdout


def test_labelled_traffic_exports_as_a_data_source(
    workspace: tuple[Path, str, pd.DataFrame], tmp_path: Path
) -> None:
    root, _, texts = workspace
    out = tmp_path / "labelled.csv"
    result = lmops(root, "feedback", "--export", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = read_labelled(str(out), root).frame
    assert len(exported) == 60
    assert dict(zip(exported["text"], exported["label"], strict=True)) == dict(
        zip(texts["text"], texts["label"].astype(str), strict=True)
    )
    both = tmp_path / "with-source.csv"
    result = lmops(root, "feedback", "--export", str(both), "--with-source")
    assert result.returncode == 0, result.stderr[-3000:]
    combined = read_labelled(str(both), root).frame
    assert len(combined) > 1000 and set(texts["text"]) <= set(combined["text"])
    assert "60 labelled from the traffic" in result.stdout


def test_an_unwritable_feedback_file_is_a_507_and_predictions_go_on(
    workspace: tuple[Path, str, pd.DataFrame], tmp_path: Path
) -> None:
    root, url, texts = workspace
    target = root / "data" / "traffic" / feedback.FEEDBACK_FILE
    kept = tmp_path / "kept.jsonl"
    shutil.move(target, kept)
    target.mkdir()  # a folder where the file should be: every write fails
    try:
        refused = httpx.post(
            f"{url}/v1/feedback", json={"request_id": "fb-3", "labels": _labels(texts, 3)}
        )
        assert refused.status_code == 507 and "could not be stored" in refused.text
        assert httpx.post(f"{url}/v1/predict", json={"texts": ["很好"]}).status_code == 200
    finally:
        target.rmdir()
        shutil.move(kept, target)
    assert len(feedback.labels_by_request(root / "data" / "traffic")) == 30
