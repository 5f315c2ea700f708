"""Headless Chromium (Debian's package) over the DevTools protocol, for the browser tests.

Every request a page makes is recorded (Network.requestWillBeSent on the page's own target,
so the browser's housekeeping traffic is not counted), so a test can fail a page that loads
a script, a style, a font or an image from anywhere but this machine. What the page rendered
is read back from the live DOM after its scripts ran."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

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
