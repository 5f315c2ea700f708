"""The server's pages in a real browser (Debian's headless Chromium), offline.

Chromium is driven over the DevTools protocol: every request the page makes is recorded
(Network.requestWillBeSent on the page's own target, so the browser's housekeeping
traffic is not counted), and a page that loads a script, a style, a font or an image from
anywhere but this machine fails the test. What the page rendered is read back from the
live DOM after its scripts ran: Swagger UI and ReDoc build the whole page in JavaScript."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LOCAL = {"127.0.0.1", "localhost", "[::1]", ""}


class Page:
    """One headless Chromium with one tab, over the DevTools protocol."""

    def __init__(self, tmp_path: Path) -> None:
        from websockets.sync.client import connect

        assert Path(CHROMIUM).is_file(), (
            "Debian's chromium is not installed (make test installs it as root: "
            "apt-get install chromium)"
        )
        profile = tmp_path / "chromium"
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0
        self.requests: list[str] = []
        self.call("Network.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            self._event(message)
            if message.get("id") == self.next_id:
                assert "error" not in message, message["error"]
                return message.get("result", {})

    def _event(self, message: dict[str, Any]) -> None:
        if message.get("method") == "Network.requestWillBeSent":
            self.requests.append(message["params"]["request"]["url"])

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str, ready: str, seconds: float = 30) -> str:
        """Navigate, wait until the JavaScript expression `ready` is true, return the DOM."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + seconds
        while not self.evaluate(f"document.readyState === 'complete' && !!({ready})"):
            assert time.monotonic() < deadline, f"{url} never rendered ({ready})"
            time.sleep(0.2)
        return self.evaluate("document.documentElement.outerHTML")

    def images_loaded(self) -> bool:
        return self.evaluate(
            "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        )

    def remote_requests(self) -> list[str]:
        return [
            url
            for url in self.requests
            if urlparse(url).scheme in ("http", "https", "ws", "wss")
            and urlparse(url).hostname not in LOCAL
        ]

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait()


@pytest.fixture
def page(tmp_path: Path) -> Any:
    opened = Page(tmp_path)
    yield opened
    opened.close()


def test_the_landing_page_says_what_is_served(served: tuple[str, Path], page: Page) -> None:
    url, _ = served
    metadata = httpx.get(f"{url}/v2/models/lmops").json()
    dom = page.open(f"{url}/", "document.getElementById('curl')")
    assert metadata["versions"][0] in dom
    assert "curl -s" in dom and "/v1/predict" in dom
    assert ", ".join(metadata["parameters"]["labels"]) in dom
    assert page.remote_requests() == []


def test_swagger_ui_renders_every_operation_offline(served: tuple[str, Path], page: Page) -> None:
    url, _ = served
    # Swagger UI draws one "opblock" per operation from the schema it fetched: only when its
    # JavaScript and styles came from the server itself, here with no network.
    dom = page.open(f"{url}/docs", "document.querySelectorAll('.opblock').length > 5")
    for path in ("/v1/predict", "/v2/models/{name}/infer", "/v2/health/ready"):
        assert f'data-path="{path}"' in dom, f"{path} not rendered"
    version = httpx.get(f"{url}/v2/models/lmops").json()["versions"][0]
    assert version in dom  # the schema's version is the served model's
    assert any("/static-offline-docs/swagger-ui-bundle.js" in r for r in page.requests)
    assert page.remote_requests() == []


def test_the_check_sees_a_page_that_reaches_out(page: Page, tmp_path: Path) -> None:
    """The checks can fail: a script from a CDN is a remote request, a missing image is
    not loaded."""
    html = tmp_path / "cdn.html"
    html.write_text(
        '<html><body><p id="here">hi</p><img src="missing.png">'
        '<script src="https://cdn.example.com/x.js"></script></body></html>',
        "utf-8",
    )
    page.open(html.as_uri(), "document.getElementById('here')")
    assert page.remote_requests() == ["https://cdn.example.com/x.js"]
    assert not page.images_loaded()


def test_make_ui_on_another_port_reaches_its_own_api(page: Page, tmp_path: Path) -> None:
    """`make ui UI_PORT=N`: the Prefect UI must ask the API on port N, not 4200 (it said
    "Can't connect to Server API at http://127.0.0.1:4200/api" before)."""
    import os
    import signal
    import socket

    from tests.conftest import REPO_ROOT, wait_healthy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed-stamp", "ui", f"UI_PORT={port}"],
        cwd=REPO_ROOT,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}/api/health", server), "make ui failed"
        text = "document.body.innerText"
        page.open(
            f"http://127.0.0.1:{port}/dashboard",
            f"{text}.includes('Dashboard') || {text}.includes(\"Can't connect\")",
            seconds=90,
        )
        shown = page.evaluate(text)
        assert "Can't connect" not in shown, shown[:500]
        assert any(f"127.0.0.1:{port}/api/" in url for url in page.requests)
        assert not any(":4200/" in url for url in page.requests)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
