"""The registry and promotion, end to end in a temporary git repo with real GTO tags, real
DVC and a real Prefect server: concurrent runs, a good candidate through staging to prod,
a worse one refused with the failing gate named, rollback, the history of all of it, and
a server on `--stage prod` following the registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmops import registry
from lmops.config import apply_overrides, load_params
from lmops.errors import LmopsError
from lmops.serving.pages import model_page
from lmops.workspace import LOCK_FILE
from tests.conftest import (
    free_port,
    git,
    run_lmops,
    serve_stage,
    start_server,
    stop_server,
    tiny_git_project,
    tool_env,
)

pytestmark = pytest.mark.e2e

# The tiny profile fine-tunes one epoch: barely better than a coin. Six epochs make a
# clearly better model (0.75 vs 0.52 test accuracy when measured), one epoch from another
# seed a clearly worse one.
BETTER = ["--set", "finetune.epochs=6", "--set", "finetune.patience=0"]
# Clearly worse: one epoch at a learning rate that barely moves the weights. (A one-epoch
# model at the tiny profile's own rate is as good as a six-epoch one.)
WORSE = ["--set", "finetune.epochs=1", "--set", "finetune.learning_rate=1.0e-5"]


def lmops(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_lmops(root, *args, env=env)


def lmops_background(root: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmops", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_git_project(tmp_path_factory.mktemp("registry-project"))
    return root


@pytest.fixture(scope="module")
def env(prefect_server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """No git identity at all, as on a fresh machine: the registry must bring its own."""
    empty = tmp_path_factory.mktemp("no-git-identity")
    return {**prefect_server["env"], "HOME": str(empty), "GIT_CONFIG_GLOBAL": "/dev/null"}


def test_concurrent_runs_wait_or_fail_clearly_and_first_model_reaches_prod(
    project: Path, env: dict
) -> None:
    first = lmops_background(project, env, "run")
    owner = (project / LOCK_FILE).with_suffix(".owner")
    deadline = time.monotonic() + 120
    while not owner.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    params_before = (project / "params.yaml").read_bytes()

    impatient = lmops(project, env, "run", "--set", "orchestration.lock_timeout_minutes=0")
    assert impatient.returncode == 1
    assert "another run holds the workspace lock" in impatient.stderr
    assert "flow-run:" in impatient.stderr  # names the holder
    assert (project / "params.yaml").read_bytes() == params_before  # never wrote its override

    patient = lmops_background(project, env, "run")
    first_out, first_err = first.communicate(timeout=900)
    assert first.returncode == 0, first_err
    assert "v0.0.1 (newly registered); PROMOTED to prod" in first_out
    patient_out, patient_err = patient.communicate(timeout=900)
    assert patient.returncode == 0, patient_err
    assert "up to date, skipped" in patient_out and " ran\n" not in patient_out
    assert "v0.0.1 (already registered)" in patient_out

    assert registry.stage_version(project, "prod") == "v0.0.1"
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=project, env=tool_env(), capture_output=True
    )
    assert b"up to date" in status.stdout
    # The registration commit was made with lmops's own identity (none is configured).
    assert "lmops <lmops@localhost>" in git(project, "log", "-1", "--format=%an <%ae>")


def test_better_candidate_goes_through_staging_to_prod(project: Path, env: dict) -> None:
    result = lmops(project, env, "run", *BETTER)
    assert result.returncode == 0, result.stderr
    assert (
        "v0.0.2 (newly registered); PROMOTED to prod: gates passed against v0.0.1" in result.stdout
    )
    assert registry.stage_version(project, "prod") == "v0.0.2"
    events = [
        (e["event"], e["stage"]) for e in registry.history(project) if e["version"] == "v0.0.2"
    ]
    assert events == [("registration", None), ("assignment", "staging"), ("assignment", "prod")]


def test_worse_candidate_is_refused_naming_the_gate(project: Path, env: dict) -> None:
    tags_before = git(project, "tag")
    result = lmops(project, env, "run", *WORSE)
    assert result.returncode == 0, result.stderr  # training succeeded; promotion said no
    # It may fail min_accuracy too (a near-constant model); accuracy_vs_prod must be named.
    refusal = result.stdout.split("v0.0.3 (newly registered); not promoted: refused: ")[1]
    assert "accuracy_vs_prod" in refusal.splitlines()[0]

    again = lmops(project, env, "promote", "v0.0.3")
    assert again.returncode == 1
    assert "error: v0.0.3 not promoted, refused: " in again.stderr
    assert "accuracy_vs_prod" in again.stderr
    assert "| accuracy_vs_prod | **FAIL** |" in again.stdout  # the report, with numbers
    assert registry.stage_version(project, "prod") == "v0.0.2"
    assert registry.stage_version(project, "staging") == "v0.0.2"
    assert set(git(project, "tag").split()) - set(tags_before.split()) == {"lmops@v0.0.3"}
    with pytest.raises(LmopsError, match="never been in staging"):
        registry.assign(project, "v0.0.3", "prod", "test", "skipping staging")


def test_models_lists_versions_with_stages_and_metrics(project: Path, env: dict) -> None:
    result = lmops(project, env, "models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["version", "stages", "accuracy"]
    assert lines[1].split()[:2] == ["v0.0.3", "-"]
    assert lines[2].split()[:2] == ["v0.0.2", "staging,prod"]
    rows = json.loads(lmops(project, env, "models", "--json").stdout)
    better, worse = rows[1], rows[0]
    assert better["accuracy"] > worse["accuracy"]


def test_two_replicas_on_prod_follow_a_rollback_without_a_failed_request(
    project: Path, env: dict, tmp_path: Path
) -> None:
    """Two servers on different ports follow the same registry: when prod moves (a
    rollback is an assignment like a promotion), both swap to the new version within their
    poll interval while a client keeps sending to both, and no request fails."""
    import threading

    # Poll fast for the test; written like any --set, so the workspace stays consistent.
    apply_overrides(project, {"serve.poll_seconds": 0.3})
    replicas = [serve_stage(project, tmp_path / f"serve-{n}.log") for n in range(2)]
    urls = [f"{base}/v1/predict" for base, _ in replicas]
    servers = [server for _, server in replicas]
    seen: list[list[str]] = [[], []]
    failures: list[str] = []
    stop = threading.Event()

    def keep_asking(n: int) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    answer = client.post(urls[n], json={"texts": ["质量很好"]})
                    answer.raise_for_status()
                    seen[n].append(answer.json()["version"])
                except httpx.HTTPError as err:
                    failures.append(f"replica {n}: {err!r}")

    clients = [threading.Thread(target=keep_asking, args=(n,)) for n in range(2)]
    try:
        for client in clients:
            client.start()
        time.sleep(1)
        assert all(s and s[-1] == "v0.0.2" for s in seen)

        result = lmops(project, env, "rollback")
        assert result.returncode == 0, result.stderr
        assert "prod: v0.0.2 -> v0.0.1" in result.stdout

        deadline = time.monotonic() + 30
        while not all(s[-1] == "v0.0.1" for s in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(s[-1] == "v0.0.1" for s in seen), [s[-1] for s in seen]
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=30)
        for server in servers:
            assert stop_server(server) in (0, -15)  # uvicorn re-raises the SIGTERM it handled
        git(project, "checkout", "--", "params.yaml")
    assert not failures, failures[:5]
    assert all(len(s) > 20 for s in seen)  # both kept answering throughout


def test_a_fresh_clone_elsewhere_serves_prod_pulled_from_the_remote(
    project: Path, tmp_path: Path
) -> None:
    """Registration pushed each version's data and models to registry.remote; a clone at
    another path, with an empty DVC cache and no .dvc/config.local, serves prod from it."""
    remote = Path(load_params(project).registry.remote)
    assert any(p.is_file() for p in remote.rglob("*")), "registration pushed nothing"
    clone = tmp_path / "elsewhere" / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / ".dvc" / "cache").exists()
    prod = registry.stage_version(project, "prod")
    base, server = serve_stage(clone, tmp_path / "serve.log")
    try:
        answer = httpx.post(f"{base}/v1/predict", json={"texts": ["质量很好"]}, timeout=10)
        assert answer.status_code == 200 and answer.json()["version"] == prod
    finally:
        assert stop_server(server) in (0, -15)
    local = (clone / ".dvc" / "config.local").read_text("utf-8")
    assert "remote = lmops" in local and str(remote) in local


def test_history_shows_promotions_refusal_free_and_the_rollback(project: Path, env: dict) -> None:
    result = lmops(project, env, "models", "--history", "--json")
    history = json.loads(result.stdout)
    prod = [(e["version"], e["why"]) for e in history if e["stage"] == "prod"]
    assert [version for version, _ in prod] == ["v0.0.1", "v0.0.2", "v0.0.1"]
    assert prod[-1][1] == "rollback from v0.0.2"
    assert all(e["by"] for e in history)
    assert any(e["by"].startswith("flow-run:") for e in history)
    assert history[-1]["by"].startswith("user:")
    # The refused candidate was registered, never assigned.
    assert [e["event"] for e in history if e["version"] == "v0.0.3"] == ["registration"]
    text = lmops(project, env, "models", "--history").stdout
    assert "rollback from v0.0.2" in text and "accuracy" in text


@pytest.mark.browser
def test_model_pages_show_every_version_offline(
    project: Path, env: dict, tmp_path: Path, page: Any
) -> None:
    """The registry index and a version's page, served by `lmops serve`, in a real browser
    with no network: every version listed, the figures of metrics.json beside the baseline
    and prod, its pictures loaded, its history; and their faults are 404s or a warning."""
    base, server = serve_stage(project, tmp_path / "serve.log")
    drift = project / "reports" / "drift"
    try:
        index = page.open(f"{base}/models", "document.querySelector('table')")
        for version in ("v0.0.1", "v0.0.2", "v0.0.3"):
            assert f'href="models/{version}"' in index
        assert "v0.0.1</a> (served here)" in index

        dom = page.open(f"{base}/models/v0.0.2", "document.images.length >= 4")
        assert page.images_loaded()
        metrics = registry.metrics_at(project, registry.commit_of(project, "v0.0.2"))
        assert metrics is not None
        assert f"{metrics.model.accuracy:.4f}" in dom and f"{metrics.baseline.accuracy:.4f}" in dom
        assert "prod (v0.0.1)" in dom  # beside prod's figures
        assert "registration" in dom and "assignment to prod" in dom  # its history
        # The served variant's figures from its promotion record, and the paired gate vs prod.
        (promoted,) = [
            e
            for e in registry.history(project)
            if e["version"] == "v0.0.2" and e["stage"] == "prod"
        ]
        assert f"{promoted['metrics']['p50_latency_ms']:.3f} ms" in dom
        # What it costs to serve (measured by the promotion) and what it cost to train.
        assert f"{promoted['metrics']['cpu_ms_per_1k_texts']:,.1f} ms per 1,000 texts" in dom
        training = promoted["metrics"]["training_cost"]
        assert training["wall_seconds"] > 0 and f"{training['cpu_seconds']:,.1f} CPU-s" in dom
        assert "| stage | wall s | CPU s |" not in dom and "peak memory MB" in dom  # the card's
        assert "accuracy vs prod" in dom
        # Accuracy on every test row and on the rows the labels stage did not flag.
        found = metrics.label_issues
        assert found is not None and "Label issues (test)" in dom
        assert f"{found.test_flagged:,} test rows are flagged" in dom
        assert f"{found.accuracy_unflagged:.4f}" in dom
        issues = page.open(f"{base}/reports/labels/", "document.querySelector('table')")
        assert "Label issues" in issues and "data.label_issues: report" in issues
        assert "Most confident mistakes, explained" in dom and "Deletion test on" in dom
        assert "confusion.png" in dom and "Model card" in dom
        assert "No drift check has run here yet" in dom
        assert page.remote_requests() == []

        unknown = httpx.get(f"{base}/models/v9.9.9", timeout=30)
        assert unknown.status_code == 404 and "v9.9.9" in unknown.text and "v0.0.1" in unknown.text
        outside = httpx.get(f"{base}/models/v0.0.2/plots/..%2Fmetrics.json", timeout=30)
        assert outside.status_code == 404
        drift.mkdir(exist_ok=True)
        (drift / "latest.json").write_text("{", "utf-8")  # a torn drift summary
        warned = httpx.get(f"{base}/models/v0.0.1", timeout=30)
        assert warned.status_code == 200 and "latest.json" in warned.text
        assert "rollback from v0.0.2" in warned.text  # v0.0.1's history, with its records
        answer = httpx.post(f"{base}/v1/predict", json={"texts": ["质量很好"]}, timeout=10)
        assert answer.status_code == 200  # predictions never depend on the pages
    finally:
        assert stop_server(server) in (0, -15)
        shutil.rmtree(drift, ignore_errors=True)


def test_staging_earns_prod_with_live_evidence_from_the_shadow(
    project: Path, env: dict, tmp_path: Path
) -> None:
    """With promotion.live.required, staging's version goes to prod only once a server has
    shadowed it beside prod: `lmops serve --stage prod --challenger staging` gathers the
    evidence, `lmops promote` reads it, and the promotion record keeps it."""
    assert registry.stage_version(project, "prod") == "v0.0.1"
    assert registry.stage_version(project, "staging") == "v0.0.2"
    alone = lmops(project, env, "serve", "--challenger", "staging")
    assert alone.returncode == 1 and "--challenger needs --stage" in alone.stderr
    # The plumbing is under test here (tests/unit/test_challenger.py tests the rule): the
    # tiny models disagree often, so agreement and margin are set out of their way.
    live = {
        "promotion.live.required": True,
        "promotion.live.min_texts": 40,
        "promotion.live.min_agreement": 0.0,
        "promotion.live.estimated_accuracy_margin": 0.5,
    }
    apply_overrides(project, live)
    # Staging moves back to v0.0.1 (it held it once), so that v0.0.2 comes up anew.
    registry.assign(project, "v0.0.1", "staging", "user:tests", "to stage v0.0.2 again")
    try:
        staged = lmops(project, env, "promote", "v0.0.2")
        assert staged.returncode == 0, staged.stderr
        assert "v0.0.2 to staging: gates passed against v0.0.1; in staging until it has live" in (
            staged.stdout
        )
        assert registry.stage_version(project, "staging") == "v0.0.2"
        assert registry.stage_version(project, "prod") == "v0.0.1"

        port = free_port()
        command = [sys.executable, "-m", "lmops", "serve", "--stage", "prod"]
        command += ["--challenger", "staging", "--port", str(port)]
        server = start_server(command, project, port, tmp_path / "serve.log")
        url = f"http://127.0.0.1:{port}"
        try:
            for n in range(25):
                answer = httpx.post(
                    f"{url}/v1/predict", json={"texts": ["质量很好", f"第{n}次买，太差了"]}
                )
                assert answer.status_code == 200 and answer.json()["version"] == "v0.0.1"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = httpx.get(f"{url}/v2/models/lmops").json()["parameters"]["challenger"]
                if status["shadow"]["texts"] == 50:
                    break
                time.sleep(0.1)
            assert status["version"] == "v0.0.2" and status["shadow"]["texts"] == 50
            shown = lmops(project, env, "models", "--url", url)
            assert shown.returncode == 0, shown.stderr
            assert "challenger from staging: v0.0.2; shadow 50 texts, agreement " in shown.stdout
        finally:
            assert stop_server(server) in (0, -15)
        assert "challenger v0.0.2 from staging (shadow 100%)" in (tmp_path / "serve.log").read_text(
            "utf-8"
        )

        promoted = lmops(project, env, "promote", "v0.0.2")
        assert promoted.returncode == 0, promoted.stderr
        assert "promoted v0.0.2 to prod (via staging)" in promoted.stdout
        assert "| live_shadow_texts | pass | 50 texts shadowed beside prod |" in promoted.stdout
        assert "| live_estimated_accuracy | pass |" in promoted.stdout
        assert registry.stage_version(project, "prod") == "v0.0.2"
        record = [e for e in registry.history(project) if e["stage"] == "prod"][-1]
        evidence = record["metrics"]["live_evidence"]
        assert evidence["texts"] == 50
        assert evidence["agreement"] == pytest.approx(status["shadow"]["agreement"], abs=1e-4)
        page = model_page("lmops", registry.version_page(project, "v0.0.2"), "v0.0.2", None, None)
        assert "live evidence (shadowed beside prod)</th><td>50 texts since " in page
        assert "live estimated accuracy</th><td>" in page  # the paired interval's row
    finally:
        git(project, "checkout", "--", "params.yaml")
        back = lmops(project, env, "rollback")
        assert back.returncode == 0 and registry.stage_version(project, "prod") == "v0.0.1"


def _damage(version_dir: Path, cache: Path | None = None) -> None:
    """Flip bytes in the middle of every ONNX file of a local copy (and, given the DVC
    cache, in the cache objects they came from)."""
    import hashlib

    for path in version_dir.glob("*.onnx"):
        targets = [path]
        if cache is not None:
            md5 = hashlib.md5(path.read_bytes()).hexdigest()
            targets.append(cache / "files" / "md5" / md5[:2] / md5[2:])
        for target in targets:
            assert target.is_file(), target
            target.chmod(0o644)
            data = bytearray(target.read_bytes())
            middle = len(data) // 2
            data[middle : middle + 64] = bytes(64)
            target.write_bytes(bytes(data))


def test_prod_broken_at_start_refetches_then_falls_back_loudly(
    project: Path, env: dict, tmp_path: Path
) -> None:
    """A restart while prod's copy is damaged: a damaged local copy is fetched again; when
    DVC's copy is damaged too, the version that was in prod before serves, and the server,
    its metrics and `lmops models --url` all say so. With no good version, one line, exit 1."""
    assert registry.stage_version(project, "prod") == "v0.0.1"
    local = project / registry.MATERIALIZED_DIR
    assert (local / "v0.0.1").is_dir() and (local / "v0.0.2").is_dir()
    serve = [sys.executable, "-m", "lmops", "serve", "--stage", "prod"]

    _damage(local / "v0.0.1")
    port = free_port()
    server = start_server([*serve, "--port", str(port)], project, port, tmp_path / "a.log")
    try:
        served = httpx.get(f"http://127.0.0.1:{port}/v2/models/lmops").json()
        assert served["versions"] == ["v0.0.1"]
        assert served["parameters"]["following"]["in_sync"] is True
        status = lmops(project, env, "models", "--url", f"http://127.0.0.1:{port}")
        assert status.returncode == 0 and "serves v0.0.1, the version prod names" in status.stdout
    finally:
        stop_server(server)
    assert "the local copy failed its check" in (tmp_path / "a.log").read_text("utf-8")

    _damage(local / "v0.0.1", cache=project / ".dvc" / "cache")
    port = free_port()
    server = start_server([*serve, "--port", str(port)], project, port, tmp_path / "b.log")
    url = f"http://127.0.0.1:{port}"
    try:
        served = httpx.get(f"{url}/v2/models/lmops").json()
        assert served["versions"] == ["v0.0.2"]
        following = served["parameters"]["following"]
        assert following["stage"] == "prod" and following["version"] == "v0.0.1"
        assert following["in_sync"] is False and "v0.0.1 cannot be served" in following["problem"]
        assert "lmops_model_in_sync 0.0" in httpx.get(f"{url}/metrics").text
        assert httpx.post(f"{url}/v1/predict", json={"texts": ["好"]}).json()["version"] == (
            "v0.0.2"
        )
        status = lmops(project, env, "models", "--url", url)
        assert status.returncode == 1
        assert "registry: staging" in status.stdout and "prod v0.0.1" in status.stdout
        assert "serves v0.0.2, but prod names v0.0.1: OUT OF SYNC" in status.stdout
    finally:
        stop_server(server)
    log = (tmp_path / "b.log").read_text("utf-8")
    assert "FALLBACK" in log and "Traceback" not in log

    _damage(local / "v0.0.2", cache=project / ".dvc" / "cache")
    refused = subprocess.run(
        [*serve, "--port", str(free_port())],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert "error: cannot serve stage prod: v0.0.1 cannot be served" in refused.stderr


def test_a_version_from_an_older_metrics_format_is_listed_without_figures(
    tmp_path: Path,
) -> None:
    """A registry that an older lmops filled (metrics.json before the paired gates) still
    lists: the version shows, its figures blank, and gating it would name the field."""
    import gto.api

    from lmops.artifacts import CorruptArtifact

    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "reports").mkdir()
    old = {"model": {"accuracy": 0.81}, "baseline": {"accuracy": 0.84}, "gates": {"passed": True}}
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(old), "utf-8")
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(tmp_path), *identity, "commit", "-qm", "old"], check=True)
    gto.api.register(
        str(tmp_path), registry.ARTIFACT, "HEAD", version="v0.0.1", author="t", author_email="t@t"
    )
    (row,) = registry.versions(tmp_path)
    assert row["version"] == "v0.0.1" and row["accuracy"] is None and row["gates_passed"] is None
    with pytest.raises(CorruptArtifact, match="metrics.json at .* is not a valid Metrics"):
        registry.metrics_at(tmp_path, row["commit"])
