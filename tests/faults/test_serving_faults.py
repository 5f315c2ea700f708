"""Faults injected into a real `lmops serve` process: poison texts among normal callers,
a traffic-log folder that vanishes, turns into a file or fills up, hostile HTTP edges, and
SIGTERM under load. In each case the predictions of everyone else are still answered."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import serve, serving_workspace, stop_server

pytestmark = pytest.mark.faults

# JSON may escape a lone surrogate, which no UTF-8 text can hold: Python decodes it, the
# tokenizer cannot take it. Sent as raw bytes, since a client library refuses to encode it.
POISON_BODY = b'{"texts": ["\\u597d\\u8bc4", "\\ud800 a lone surrogate"]}'


def _predict(url: str, texts: list[str], **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", json={"texts": texts}, headers=headers, timeout=30)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _records(folder: Path) -> list[dict]:
    """Every line of the traffic log, each required to be whole JSON."""
    return [
        json.loads(line)
        for path in sorted(folder.glob("*.jsonl"))
        for line in path.read_text("utf-8").splitlines()
    ]


def _logged(folder: Path, marker: str, timeout: float = 10) -> bool:
    """Whether a record of `marker` reaches the log (written off the request path)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.is_dir() and any(r.get("text") == marker for r in _records(folder)):
            return True
        time.sleep(0.1)
    return False


def test_a_poison_text_fails_only_its_own_request(served: tuple[str, Path]) -> None:
    url, _ = served
    results: dict[str, list[int]] = {"normal": [], "poison": []}
    bodies: list[str] = []
    stop = time.monotonic() + 3

    def client(kind: str) -> None:
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop:
                if kind == "poison":
                    response = http.post(
                        f"{url}/v1/predict",
                        content=POISON_BODY,
                        headers={"content-type": "application/json"},
                    )
                else:
                    response = http.post(f"{url}/v1/predict", json={"texts": ["好", "太差了"]})
                results[kind].append(response.status_code)
                if kind == "poison":
                    bodies.append(response.json()["error"])

    threads = [threading.Thread(target=client, args=("normal",)) for _ in range(20)]
    threads.append(threading.Thread(target=client, args=("poison",)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["normal"] and set(results["normal"]) == {200}
    assert results["poison"] and set(results["poison"]) == {422}
    assert "text 1" in bodies[0] and "Unicode" in bodies[0]
    assert _predict(url, ["still serving"]).status_code == 200


def test_traffic_log_folder_missing_then_a_file_then_back(served: tuple[str, Path]) -> None:
    url, root = served
    folder = root / "data" / "traffic"
    # Deleted under the running server: records must not go into the unlinked file.
    _predict(url, ["before delete"])
    assert _logged(folder, "before delete")
    shutil.rmtree(folder)
    assert _predict(url, ["after delete"]).status_code == 200
    assert _logged(folder, "after delete"), "the log did not reopen after its folder was deleted"

    # Replaced by a file: every prediction is still answered; the loss is counted and shown.
    errors_before = _metric(url, 'lmops_traffic_log_errors_total{kind="write"}')
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    answers = [_predict(url, [f"while broken {i}"]).status_code for i in range(5)]
    assert answers == [200] * 5
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/v2/health/ready").json()["traffic_log"]["status"] != "degraded":
        assert time.monotonic() < deadline, "ready never reported the degraded traffic log"
        time.sleep(0.1)
    ready = httpx.get(f"{url}/v2/health/ready")
    assert ready.status_code == 200, "a degraded log must not take the server out of rotation"
    assert "FileExistsError" in ready.json()["traffic_log"]["error"]
    model = httpx.get(f"{url}/v2/models/lmops").json()
    assert model["parameters"]["traffic_log"]["status"] == "degraded"
    assert _metric(url, 'lmops_traffic_log_errors_total{kind="write"}') >= errors_before + 1

    # Back: logging resumes by itself.
    folder.unlink()
    _predict(url, ["after repair"])
    assert _logged(folder, "after repair"), "logging did not resume once the folder was back"
    assert httpx.get(f"{url}/v2/health/ready").json()["traffic_log"]["status"] == "ok"


def test_disk_full_answers_every_prediction_and_leaves_no_partial_line(
    tiny_export: Callable[[int], Path], tmp_path: Path
) -> None:
    """RLIMIT_FSIZE stands in for a full disk: a write past it stops part-way (EFBIG), as on
    a full disk. The server log goes to a file too, so the limit leaves it room."""
    root = serving_workspace(tiny_export, tmp_path)
    limit = 256 * 1024

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    url, process = serve(root, preexec_fn=small_disk)
    try:
        texts = [f"这是一条很长的评论，用来填满磁盘 {i} " * 8 for i in range(64)]
        answers = [_predict(url, texts).status_code for _ in range(40)]
        assert answers == [200] * 40
        folder = root / "data" / "traffic"
        deadline = time.monotonic() + 10
        while _metric(url, 'lmops_traffic_log_errors_total{kind="write"}') < 1:
            assert time.monotonic() < deadline, "a failed write was not counted"
            time.sleep(0.1)
        records = _records(folder)  # raises on any cut-off line
        assert 0 < len(records) < 40 * 64
        assert sum(p.stat().st_size for p in folder.glob("*.jsonl")) <= limit
        assert all(p.read_bytes().endswith(b"\n") for p in folder.glob("*.jsonl"))
        # Room again: logging resumes without a restart.
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        _predict(url, ["room again"])
        assert _logged(folder, "room again")
    finally:
        stop_server(process)


def test_a_chunked_body_over_the_limit_is_413(served: tuple[str, Path]) -> None:
    url, _ = served
    limit = 1048576  # serve.max_body_bytes

    def chunks() -> Iterator[bytes]:
        yield b'{"texts": ["'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"]}'

    response = httpx.post(
        f"{url}/v1/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "serve.max_body_bytes" in response.json()["error"]
    small = httpx.post(
        f"{url}/v1/predict",
        content=iter([b'{"texts": ', b'["chunked but small"]}']),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200


def test_an_overlong_request_id_is_refused_and_never_stored(served: tuple[str, Path]) -> None:
    url, root = served
    long_id = "r" * 60_000
    response = _predict(url, ["id check"], **{"x-request-id": long_id})
    assert response.status_code == 400
    assert "serve.max_request_id_chars" in response.json()["error"]
    assert long_id not in response.text
    infer = httpx.post(
        f"{url}/v2/models/lmops/infer",
        json={
            "id": long_id,
            "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
        },
    )
    assert infer.status_code == 400
    _predict(url, ["id marker"], **{"x-request-id": "short-id"})
    assert _logged(root / "data" / "traffic", "id marker")
    assert not any(len(r["request_id"]) > 128 for r in _records(root / "data" / "traffic"))


def test_sigterm_drains_answers_every_request_then_stops(
    tiny_export: Callable[[int], Path], tmp_path: Path
) -> None:
    """On SIGTERM ready turns 503 at once, requests on kept-alive connections keep getting
    answers for serve.drain_seconds, and the process then stops by itself."""
    root = serving_workspace(tiny_export, tmp_path)
    url, process = serve(root)
    lost: list[str] = []
    answered: list[float] = []
    stop_sending = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:  # one kept-alive connection per client
            while not stop_sending.is_set():
                try:
                    response = http.post(f"{url}/v1/predict", json={"texts": ["排空"]})
                except httpx.ConnectError:
                    return  # the listener has closed: nothing was received, nothing lost
                except httpx.HTTPError as err:
                    lost.append(repr(err))
                    return
                assert response.status_code == 200
                answered.append(time.monotonic())

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    time.sleep(0.3)
    ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["draining"] is True
    time.sleep(3)  # a load balancer stops sending within the drain period (5 s)
    stop_sending.set()
    for thread in threads:
        thread.join()
    assert process.wait(timeout=30) in (0, -15)
    stopped_at = time.monotonic()
    assert not lost, f"requests sent while draining got no answer: {lost[:3]}"
    assert max(answered) - sent_at > 3, "requests stopped being answered before the drain ended"
    assert stopped_at - sent_at >= 5 - 0.5, "the server closed before serve.drain_seconds"


def test_traffic_log_folder_gone_at_rotation_recovers(tmp_path: Path) -> None:
    """Rotation (here by size) while the folder is gone: later records land in a new file
    in the recreated folder; before, every later write failed for good."""
    from lmops.engine import Prediction
    from lmops.serving.traffic import TrafficLog

    folder = tmp_path / "traffic"
    log = TrafficLog(folder, store_text=True, rotate_mb=0.001)  # ~1 KB files
    answer = [Prediction("positive", 0.9, {}, "v")]
    for i in range(20):
        log.append(f"r{i}", [f"text {i}"], answer, 1.0)
        log.flush()  # one write each (queued records are otherwise written together)
    assert len(list(folder.glob("*.jsonl"))) > 1  # it rotated
    shutil.rmtree(folder)
    for i in range(20, 40):
        log.append(f"r{i}", [f"text {i}"], answer, 1.0)
        log.flush()
    log.close()
    assert log.errors == 0 and log.degraded is None
    assert {r["request_id"] for r in _records(folder)} == {f"r{i}" for i in range(20, 40)}


def test_a_text_with_unicode_line_breaks_stays_one_record(served: tuple[str, Path]) -> None:
    """Found by the fuzzer: JSON leaves U+2028, U+2029 and U+0085 raw, and every reader
    that splits lines the Unicode way (`str.splitlines`) cut such a record in two."""
    url, root = served
    text = "第一行\u2028第二行\x85第三行\u2029完"
    assert _predict(url, [text], **{"x-request-id": "line-breaks"}).status_code == 200
    assert _logged(root / "data" / "traffic", text)  # _records parses every line whole
