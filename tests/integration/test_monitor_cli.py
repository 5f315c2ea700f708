"""`lmops monitor` and `lmops simulate-traffic` as a user runs them (subprocesses, a real
`lmops serve`, a tiny exported model), and the monitoring flow against a real Prefect
server: drift emits `lmops.drift.detected` once, the cooldown holds back the next."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from lmops.config import load_params, override
from lmops.simulate import corpus_sentences
from lmops.tasks.monitor import reference_model
from tests.conftest import (
    REPO_ROOT,
    free_port,
    serve,
    stop_server,
    tool_env,
    traffic_record,
    write_traffic,
)

EVENT = "lmops.drift.detected"


@pytest.fixture(scope="module")
def make_project(
    repo_params_raw: dict,
    tiny_export: Callable[[int], Path],
    tiny_validated: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., Path]:
    """`make_project(name, **dotted)`: a project folder (params.yaml with those overrides,
    models/onnx, the tiny test and val splits as data/validated) to run lmops in."""

    def make(name: str, **dotted: Any) -> Path:
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(tiny_export(0), root / "models" / "onnx")
        (root / "data" / "validated").mkdir(parents=True)
        # The test and val splits, and the manifest naming the corpus (simulate-traffic's
        # shifted scenario sends its sentences).
        for name in ("test.parquet", "val.parquet", "manifest.json"):
            shutil.copy(tiny_validated / name, root / "data" / "validated")
        raw = override(repo_params_raw, {k.replace("__", "."): v for k, v in dotted.items()})
        (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), "utf-8")
        return root

    return make


def lmops(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lmops", *args],
        cwd=root,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def imported(stderr: str) -> set[str]:
    """Top-level packages a `python -X importtime` run imported."""
    return {
        m.group(1).split(".")[0]
        for m in re.finditer(r"^import time:.*\|\s+(\S+)$", stderr, re.MULTILINE)
    }


def test_monitor_json_through_the_cli(make_project: Callable[..., Path]) -> None:
    root = make_project("monitor-cli")
    write_traffic(
        root / "data" / "traffic", corpus_sentences("builtin:zh-news", 250, seed=1, root=REPO_ROOT)
    )
    result = lmops(root, "monitor", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok" and summary["drift_detected"] is True
    version, _, _ = reference_model(root, load_params(root))
    assert summary["model"]["version"] == version and summary["model"]["variant"] == "fp32"
    assert summary["rows"]["current"] == 250 and summary["rows"]["reference"] == 300
    assert set(summary["checks"]) == {"columns", "embedding"}
    assert Path(summary["report"]["html"]).is_file()
    assert Path(summary["report"]["html"]).is_relative_to(root / "reports" / "drift")
    assert (root / "reports" / "drift" / "workspace").is_dir()
    assert "torch" not in imported(result.stderr)
    # The snapshot is named and tagged by lmops's verdict, the model and the window: what
    # the Evidently UI lists and filters runs by.
    from evidently.core.report import Snapshot

    (stored,) = (root / "reports" / "drift" / "workspace").glob("*/snapshots/*.json")
    snapshot = Snapshot.load(str(stored)).to_snapshot_model()
    assert snapshot.name.startswith(f"DRIFT · model {version} · traffic ")
    assert {"lmops", f"model:{version}", "verdict:drift"} <= set(snapshot.tags)
    assert snapshot.metadata["model_version"] == version
    assert snapshot.metadata["window_end"] == summary["traffic"]["window_end"]
    assert snapshot.metadata["lmops_verdict"] == "drift"


def test_estimated_accuracy_follows_the_true_accuracy_without_labels(
    make_project: Callable[..., Path], tiny_validated: Path, tmp_path: Path
) -> None:
    """CBPE through `lmops monitor`: traffic made of held-out texts, whose labels the
    monitor never sees. The bound tested: each window's true accuracy lies inside the
    estimate's 95% interval widened by the calibration bias measured on the reference. A
    window of the texts the model finds hardest (its least confident) estimates lower and
    is reported degraded."""
    import numpy as np
    import pandas as pd

    from lmops.engine import Engine
    from lmops.tasks.monitor import VARIANT

    root = make_project("monitor-cbpe", monitor__min_rows=50, monitor__performance__max_drop=0.02)
    held_out = pd.concat(
        [pd.read_parquet(tiny_validated / f"{split}.parquet") for split in ("test", "val")]
    )
    texts, labels = held_out["text"].tolist(), held_out["label"].astype(str).to_numpy()
    engine = Engine(root / "models" / "onnx", require_gpu=False, max_batch_size=64, variant=VARIANT)
    probabilities = engine.probabilities(texts)
    right = np.array([engine.labels[i] for i in probabilities.argmax(1)]) == labels

    def monitored(name: str, rows: np.ndarray) -> dict[str, Any]:
        folder = write_traffic(tmp_path / name, [texts[i] for i in rows])
        result = lmops(root, "monitor", "--traffic", str(folder), "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)["performance"]

    windows = np.array_split(np.random.default_rng(0).permutation(len(texts)), 3)
    in_domain = []
    for n, rows in enumerate(windows):
        estimate = monitored(f"in-domain-{n}", rows)
        bias = abs(estimate["reference_estimated_accuracy"] - estimate["reference_accuracy"])
        assert estimate["ci_low"] - bias <= right[rows].mean() <= estimate["ci_high"] + bias
        assert estimate["degraded"] is False
        in_domain.append(estimate["estimated_accuracy"])
    hardest = np.argsort(probabilities.max(1))[:100]
    hard = monitored("hard", hardest)
    assert hard["estimated_accuracy"] < min(in_domain) and hard["degraded"] is True
    assert hard["drop"] > 0.02

    plain = lmops(root, "monitor", "--traffic", str(tmp_path / "hard"))
    assert "performance: estimated accuracy" in plain.stdout and ": DEGRADED" in plain.stdout


def test_monitor_cli_too_little_traffic_and_hashes_only(
    make_project: Callable[..., Path], tmp_path: Path
) -> None:
    root = make_project("monitor-cli-edges")
    few = write_traffic(tmp_path / "few", ["很好"] * 10)
    result = lmops(root, "monitor", "--traffic", str(few), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "not_enough_data" and summary["drift_detected"] is False
    plain = lmops(root, "monitor", "--traffic", str(few))
    assert plain.returncode == 0
    assert "not enough data (n=10 < min 200)" in plain.stdout
    assert "evidently" not in imported(plain.stderr)

    now = datetime.now(UTC)
    hashed = json.loads(traffic_record("秘密", now))
    hashed["text_sha256"] = "0" * 64
    del hashed["text"]
    path = tmp_path / f"traffic-{now:%Y%m%dT%H}.jsonl"
    path.write_text(json.dumps(hashed) + "\n", encoding="utf-8")
    refused = lmops(root, "monitor", "--traffic", str(path))
    assert refused.returncode == 1
    (line,) = [x for x in refused.stderr.splitlines() if not x.startswith("import time:")]
    assert line.startswith("error: ") and "serve.traffic.store_text: true" in line


@pytest.fixture(scope="module")
def served(make_project: Callable[..., Path]) -> Iterator[tuple[Path, str]]:
    root = make_project("monitor-served", monitor__min_rows=50)
    url, server = serve(root)
    yield root, url
    stop_server(server)


def test_simulated_traffic_reaches_the_log_and_the_monitor(served: tuple[Path, str]) -> None:
    root, url = served
    for scenario in ("in-domain", "shifted"):
        result = lmops(root, "simulate-traffic", "--scenario", scenario, "--n", "60", "--url", url)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{scenario}: sent 60 texts to {url}/v1/predict, 60 answered" in result.stdout
    # Texts with phone numbers: redacted in the log (serve.traffic.redact_pii), and the
    # monitor reads the redacted texts like any other.
    with_phones = [f"客服电话1381234{n:04d}，态度很好" for n in range(10)]
    assert httpx.post(f"{url}/v1/predict", json={"texts": with_phones}).status_code == 200
    time.sleep(1)  # written by the log's own thread
    records = [
        json.loads(line)
        for path in sorted((root / "data" / "traffic").glob("traffic-*.jsonl"))
        for line in path.read_text("utf-8").splitlines()
    ]
    assert len(records) == 130
    assert set(corpus_sentences("builtin:zh-news", 60, seed=0, root=REPO_ROOT)) <= {
        r["text"] for r in records
    }
    assert sum(r["text"] == "客服电话[PHONE]，态度很好" for r in records) == 10
    assert not any("1381234" in r["text"] for r in records)
    summary = json.loads(lmops(root, "monitor", "--json").stdout)
    assert summary["status"] == "ok" and summary["rows"]["current"] == 130
    assert summary["traffic"]["served_by"] == {records[0]["model_version"]: 130}


def test_simulate_traffic_without_a_server_is_one_clear_line(
    make_project: Callable[..., Path],
) -> None:
    root = make_project("simulate-refused")
    url = f"http://127.0.0.1:{free_port()}"
    result = lmops(root, "simulate-traffic", "--scenario", "in-domain", "--url", url)
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if not x.startswith("import time:")]
    assert line.startswith(f"error: cannot reach the server at {url}")


def _flow(root: Path, env: dict[str, str]) -> dict[str, Any]:
    out = root / f"flow-result-{time.monotonic_ns()}.json"
    code = (
        "import json, sys; from lmops.flows.monitoring import monitoring; "
        "open(sys.argv[2], 'w').write(json.dumps(monitoring(project_dir=sys.argv[1])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(root), str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text("utf-8"))


def _events(api_url: str, resource_id: str, since: datetime) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{api_url}/events/filter",
        json={
            "filter": {
                "event": {"name": [EVENT]},
                "resource": {"id": [resource_id]},
                "occurred": {"since": since.isoformat()},
            },
            "limit": 50,
        },
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["events"]


def test_monitoring_flow_emits_the_drift_event_once_per_cooldown(
    make_project: Callable[..., Path], prefect_server: dict[str, Any]
) -> None:
    root = make_project("monitor-flow", serve__model_name="drift-flow-test")
    write_traffic(
        root / "data" / "traffic", corpus_sentences("builtin:zh-news", 250, seed=2, root=REPO_ROOT)
    )
    resource = "lmops.model.drift-flow-test"
    started = datetime.now(UTC)
    first = _flow(root, prefect_server["env"])
    assert first["drift_detected"] is True and first["event_emitted"] is True
    trigger = json.loads((root / "reports" / "drift" / "last_trigger.json").read_text())
    deadline = time.monotonic() + 30
    while not (events := _events(prefect_server["api_url"], resource, started)):
        assert time.monotonic() < deadline, "the event never reached the server"
        time.sleep(1)
    (event,) = events
    assert event["id"] == trigger["event_id"] and trigger["event"] == EVENT
    assert event["payload"]["drift_detected"] is True
    assert event["payload"]["report"]["html"] == first["report"]["html"]

    second = _flow(root, prefect_server["env"])
    assert second["drift_detected"] is True and second["event_emitted"] is False
    assert "suppressed by the cooldown" in second["trigger"]
    time.sleep(6)  # past the server's event-persister flush, had one been sent
    assert len(_events(prefect_server["api_url"], resource, started)) == 1

    response = httpx.post(
        f"{prefect_server['api_url']}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["drift-report"]}}, "sort": "CREATED_DESC"},
        timeout=30,
    )
    response.raise_for_status()
    ours = [a["data"] for a in response.json() if str(root) in a["data"]]
    assert len(ours) == 2
    assert "suppressed by the cooldown" in ours[0] and "emitted lmops.drift.detected" in ours[1]
    assert "| **embedding** |" in ours[0] and "file://" not in ours[0]
    # The report's link is http, to `lmops serve` (a browser blocks file:// from Prefect's UI).
    run = Path(second["report"]["html"]).parent.name
    assert f"http://127.0.0.1:8000/reports/drift/{run}/report.html" in ours[0]
