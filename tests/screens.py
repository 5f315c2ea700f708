"""`make screens`: a screenshot of every page a person opens, into reports/screens/.

Run in a project that `make run` has filled (a registered version, its Data Docs and
plots): it starts `lmops serve` on a free port, has `dvc plots show` write its page, and
photographs each page in headless Chromium (the driver of the browser tests), with no
network. A page that reached off the machine is named, and the run fails.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.browser import Page
from tests.conftest import free_port, start_server, stop_server

WIDTH, MAX_HEIGHT = 1280, 2400


def shoot(page: Page, url: str, ready: str, out: Path) -> None:
    page.open(url, ready)
    height = min(MAX_HEIGHT, int(page.evaluate("document.documentElement.scrollHeight")))
    page.call(
        "Emulation.setDeviceMetricsOverride",
        width=WIDTH,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )
    shot = page.call("Page.captureScreenshot", format="png")
    out.write_bytes(base64.b64decode(shot["data"]))
    print(f"{out}  ({url})")


def main(root: Path) -> int:
    from lmops import registry

    out = root / "reports" / "screens"
    out.mkdir(parents=True, exist_ok=True)
    version = registry.stage_version(root, "prod") if registry.is_git_repo(root) else None
    serve = [sys.executable, "-m", "lmops", "serve"]
    if version is not None:
        serve += ["--stage", "prod"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server([*serve, "--port", str(port)], root, port, Path(scratch) / "log")
        page = Page(Path(scratch))
        try:
            shots = [
                ("landing.png", f"{base}/", "document.getElementById('curl')"),
                ("docs.png", f"{base}/docs", "document.querySelectorAll('.opblock').length"),
                ("models.png", f"{base}/models", "document.querySelector('h1')"),
                (
                    "data-docs.png",
                    f"{base}/reports/validation/index.html",
                    "document.querySelector('body')",
                ),
            ]
            if version is not None:
                shots.append(
                    ("model-page.png", f"{base}/models/{version}", "document.images.length")
                )
            plots = Path(scratch) / "plots"
            subprocess.run(
                [sys.executable, "-m", "dvc", "plots", "show", "-o", str(plots)],
                cwd=root,
                check=True,
                capture_output=True,
            )
            shots.append(
                (
                    "dvc-plots.png",
                    (plots / "index.html").as_uri(),
                    "document.querySelector('svg, canvas, img')",
                )
            )
            for name, url, ready in shots:
                shoot(page, url, ready, out / name)
            remote = page.remote_requests()
        finally:
            page.close()
            stop_server(server)
    if remote:
        print(f"error: pages reached off the machine: {remote}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path.cwd()))
