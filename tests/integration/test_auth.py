"""Keys, TLS and rate limits on a real `lmops serve` (serving/auth.py): every endpoint
group open and restricted, with no key, a wrong key and the right one; the key never
written anywhere; https with a certificate made here; lmops's own clients sending the key."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    GUARD_FEEDBACK_PER_MINUTE,
    GUARD_KEYS,
    bearer,
    git,
    run_lmops,
    serve,
    serving_workspace,
    set_params,
    stop_server,
    tool_env,
)

TEXTS = ["物流很快，质量很好，很满意。", "质量很差，不推荐"]
# One endpoint of each group: (method, path, JSON body).
BY_GROUP = {
    "inference": ("POST", "/v1/predict", {"texts": TEXTS}),
    "pages": ("GET", "/", None),
    "metrics": ("GET", "/metrics", None),
    "stats": ("GET", "/v2/models/lmops/stats", None),
}


def _call(
    url: str, method: str, path: str, body: object, headers: dict[str, str]
) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)


def _predicted(url: str, headers: dict[str, str]) -> tuple[str, list[str]]:
    answer = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS}, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["request_id"], [p["label"] for p in body["predictions"]]


@pytest.mark.parametrize("group", sorted(BY_GROUP))
def test_a_restricted_group_wants_the_right_key(guarded: tuple[str, Path], group: str) -> None:
    url, _ = guarded
    method, path, body = BY_GROUP[group]
    missing = _call(url, method, path, body, {})
    assert missing.status_code == 401, missing.text
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer KEY" in missing.json()["error"]
    for wrong in ({"Authorization": "Bearer not-a-key-0123456789"}, {"Authorization": "Basic x"}):
        refused = _call(url, method, path, body, wrong)
        assert refused.status_code == (403 if "Bearer" in wrong["Authorization"] else 401)
    assert _call(url, method, path, body, bearer("alice")).status_code == 200


def test_feedback_needs_a_key_and_records_its_name(guarded: tuple[str, Path]) -> None:
    url, root = guarded
    request_id, labels = _predicted(url, bearer("alice"))
    body = {"request_id": request_id, "labels": labels}
    assert httpx.post(f"{url}/v1/feedback", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-a-key-0123456789"}
    assert httpx.post(f"{url}/v1/feedback", json=body, headers=wrong, timeout=30).status_code == 403
    assert (
        httpx.post(f"{url}/v1/feedback", json=body, headers=bearer("ci"), timeout=30).status_code
        == 403
    )
    stored = httpx.post(f"{url}/v1/feedback", json=body, headers=bearer("alice"), timeout=30)
    assert stored.status_code == 200, stored.text
    records = (root / "data" / "traffic" / "feedback.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["key"] == "alice"


def test_a_key_limited_to_a_group_is_refused_elsewhere(guarded: tuple[str, Path]) -> None:
    url, _ = guarded
    assert _predicted(url, bearer("ci"))  # the keys file gives ci inference
    for path in ("/metrics", "/"):
        refused = httpx.get(f"{url}{path}", headers=bearer("ci"), timeout=30)
        assert refused.status_code == 403
        assert "'ci' may not use" in refused.json()["error"]


def test_health_is_never_restricted(guarded: tuple[str, Path]) -> None:
    url, _ = guarded
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/lmops/ready"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200, path


def test_open_groups_need_no_key(served: tuple[str, Path]) -> None:
    """The default: nothing restricted on loopback, and feedback records no key."""
    url, root = served
    for group, (method, path, body) in BY_GROUP.items():
        assert _call(url, method, path, body, {}).status_code == 200, group
    request_id, labels = _predicted(url, {})
    body = {"request_id": request_id, "labels": labels}
    assert httpx.post(f"{url}/v1/feedback", json=body, timeout=30).status_code == 200
    records = (root / "data" / "traffic" / "feedback.jsonl").read_text().splitlines()
    assert json.loads(records[-1]).get("key") is None


def test_feedback_is_limited_per_key(guarded: tuple[str, Path]) -> None:
    url, _ = guarded
    request_id, labels = _predicted(url, bearer("bob"))
    body = {"request_id": request_id, "labels": labels}

    def post(name: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/feedback", json=body, headers=bearer(name), timeout=30)

    statuses = [post("bob").status_code for _ in range(GUARD_FEEDBACK_PER_MINUTE)]
    assert statuses == [200] * GUARD_FEEDBACK_PER_MINUTE
    limited = post("bob")
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert "rate_limits" in limited.json()["error"]
    assert post("alice").status_code == 200  # another key keeps its own allowance


def test_no_key_is_written_anywhere(guarded: tuple[str, Path]) -> None:
    """After every endpoint has been called with a key, and refused a wrong one: neither
    a key, nor its digest, is in the traffic log, the feedback file or the server's log."""
    url, root = guarded
    headers = bearer("alice")
    request_id, labels = _predicted(url, headers)
    calls = [
        ("POST", "/v1/explain", {"text": TEXTS[0]}),
        ("POST", "/v1/feedback", {"request_id": request_id, "labels": labels}),
        (
            "POST",
            "/v2/models/lmops/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": TEXTS[:1]}]},
        ),
        *[
            ("GET", path, None)
            for path in (
                "/v2",
                "/v2/models/lmops",
                "/v2/models/lmops/config",
                "/v2/models/lmops/stats",
                "/v2/models/lmops/ready",
                "/",
                "/metrics",
                "/docs",
                "/openapi.json",
            )
        ],
    ]
    for method, path, body in calls:
        assert _call(url, method, path, body, headers).status_code == 200, path
    _call(url, "GET", "/metrics", None, {"Authorization": "Bearer a-wrong-key-0123456789"})
    secrets = []
    for key in GUARD_KEYS.values():
        digest = hashlib.sha256(key.encode()).digest()
        secrets += [key.encode(), digest.hex().encode(), base64.b64encode(digest)]
    written = [
        p
        for p in root.rglob("*")
        if p.is_file() and "models" not in p.parts and p.name != "api-keys"
    ]
    assert any(p.name == "feedback.jsonl" for p in written)
    assert any(p.name == "server.log" for p in written)
    for path in written:
        content = path.read_bytes()
        assert not [s for s in secrets if s in content], f"a key is in {path}"


def test_lmops_clients_send_the_key(guarded: tuple[str, Path], tiny_validated: Path) -> None:
    url, root = guarded
    shutil.copytree(tiny_validated, root / "data" / "validated", dirs_exist_ok=True)
    args = ("simulate-traffic", "--scenario", "in-domain", "--n", "6", "--url", url)
    refused = run_lmops(root, *args)
    assert refused.returncode == 1 and "401" in refused.stderr
    sent = run_lmops(root, *args, env=tool_env(LMOPS_API_KEY=GUARD_KEYS["alice"]))
    assert sent.returncode == 0, sent.stderr
    assert "6 answered" in sent.stdout


def test_lmops_feedback_sends_labels_with_the_key(guarded: tuple[str, Path]) -> None:
    url, root = guarded
    request_id, labels = _predicted(url, bearer("dana"))
    items = root / "labels.jsonl"
    items.write_text(
        json.dumps({"request_id": request_id, "labels": labels})
        + "\n"
        + json.dumps({"request_id": "never-served", "labels": ["x"]})
        + "\n"
    )
    args = ("feedback", str(items), "--url", url)
    refused = run_lmops(root, *args)
    assert refused.returncode == 1 and "401" in refused.stderr and "LMOPS_API_KEY" in refused.stderr
    sent = run_lmops(root, *args, env=tool_env(LMOPS_API_KEY=GUARD_KEYS["dana"]))
    assert sent.returncode == 1  # one of the two ids was never served
    assert "stored 1 of 2" in sent.stdout and "404 never-served" in sent.stderr
    records = (root / "data" / "traffic" / "feedback.jsonl").read_text().splitlines()
    assert json.loads(records[-1]) | {"key": "dana", "request_id": request_id} == json.loads(
        records[-1]
    )


def test_serving_on_a_reachable_address_wants_feedback_closed(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    refused = run_lmops(tmp_path, "serve", "--host", "0.0.0.0")
    assert refused.returncode == 1
    assert "write training labels" in refused.stderr and "LMOPS_API_KEYS" in refused.stderr
    set_params(tmp_path, serve__auth__restricted=["feedback"])
    no_key = run_lmops(tmp_path, "serve", "--host", "0.0.0.0")
    assert no_key.returncode == 1 and "no key is set" in no_key.stderr


def test_a_keys_file_others_can_read_is_refused(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, serve__auth__keys_file="keys")
    made = run_lmops(tmp_path, "keys", "new", "labeller", "--groups", "feedback")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    keys_file = tmp_path / "keys"
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    assert keys_file.read_text().split() == ["labeller", key, "feedback"]
    keys_file.chmod(0o644)
    refused = run_lmops(tmp_path, "serve")
    assert refused.returncode == 1
    assert "can be read by others" in refused.stderr and key not in refused.stderr


def test_tls_serves_https_and_the_cli_follows(
    tiny_export: Callable[[int], Path], tmp_path: Path
) -> None:
    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    root = serving_workspace(tiny_export, tmp_path / "tls")
    certificate.private_key_and_cert_chain_pem.write_to_path(str(root / "server.pem"))
    ca = root / "ca.pem"
    authority.cert_pem.write_to_path(str(ca))
    set_params(
        root,
        serve__tls__certfile="server.pem",
        serve__tls__keyfile="server.pem",
        serve__auth__restricted=["inference"],
    )
    key = "tls-key-0123456789abcdef"
    url, process = serve(root, env=tool_env(LMOPS_API_KEYS=f"ops={key}"), ca=ca)
    try:
        assert url.startswith("https://")
        answer = httpx.post(
            f"{url}/v1/predict",
            json={"texts": TEXTS},
            headers={"Authorization": f"Bearer {key}"},
            verify=str(ca),
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(f"{url}/v2/health/ready", timeout=30)
        git(root, "init", "-q")
        git(root, "commit", "-q", "--allow-empty", "-m", "workspace")
        models = run_lmops(
            root,
            "models",
            "--url",
            url,
            env=tool_env(LMOPS_API_KEY=key, SSL_CERT_FILE=str(ca)),
        )
        assert models.returncode == 0, models.stderr
        assert f"server {url}: serves" in models.stdout
    finally:
        stop_server(process)
