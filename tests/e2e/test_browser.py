"""The server's pages in a real browser (Debian's headless Chromium, tests/browser.py),
offline: a page that loads a script, a style, a font or an image from anywhere but this
machine fails its test. Swagger UI builds the whole page in JavaScript, so what it rendered
is read from the live DOM."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.browser import Page

pytestmark = pytest.mark.browser


def test_the_landing_page_says_what_is_served(served: tuple[str, Path], page: Page) -> None:
    url, _ = served
    metadata = httpx.get(f"{url}/v2/models/lmops").json()
    dom = page.open(f"{url}/", "document.getElementById('curl')")
    assert metadata["versions"][0] in dom
    assert "curl -s" in dom and "/v1/predict" in dom
    assert ", ".join(metadata["parameters"]["labels"]) in dom
    assert page.remote_requests() == []


def test_the_landing_page_colours_each_token_of_an_explanation(
    served: tuple[str, Path], page: Page
) -> None:
    url, _ = served
    page.open(f"{url}/", "document.getElementById('explain-form')")
    text = page.evaluate("document.getElementById('explain-text').value")
    page.evaluate("document.querySelector('#explain-form button').click()")
    deadline = time.monotonic() + 30
    while not page.evaluate("document.querySelectorAll('#explanation .token').length"):
        assert time.monotonic() < deadline, "no explanation was drawn"
        time.sleep(0.2)
    answer = httpx.post(f"{url}/v1/explain", json={"text": text}).json()
    drawn = page.evaluate(
        "Array.from(document.querySelectorAll('#explanation .token'))"
        ".map(s => [s.textContent, getComputedStyle(s).backgroundColor])"
    )
    assert [t for t, _ in drawn] == [t["text"] for t in answer["tokens"]]
    # The heaviest token is drawn at full strength, in the colour of its sign.
    heaviest = max(range(len(drawn)), key=lambda i: abs(answer["tokens"][i]["weight"]))
    colour = "rgb(26, 127, 55)" if answer["tokens"][heaviest]["weight"] >= 0 else "rgb(179, 38, 30)"
    assert drawn[heaviest][1] == colour
    assert page.evaluate("document.getElementById('explanation').textContent").endswith(
        text[answer["tokens"][-1]["end"] :]
    )
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
