"""The server's own pages: a landing page at `/` that says what is served and how to call it.

Plain HTML with its styles inline: nothing is loaded from anywhere, so the page works on a
machine with no network. The interactive docs (`/docs`) come from fastapi-offline, which
serves Swagger UI's files from the package itself.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

EXAMPLE_TEXTS = ["质量很好，非常满意", "太差了，再也不买了"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 58rem;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } .sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6rem 0 1.2rem; }
td, th { border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem 0.3rem 0; text-align: left;
         vertical-align: top; }
code, pre { font-family: ui-monospace, monospace; background: #f4f4f4; }
pre { padding: 0.8rem; overflow-x: auto; }
.ok { color: #1a7f37; } .warn { color: #b35900; }
"""

ENDPOINTS = [
    ("POST", "/v1/predict", "labels and probabilities for a list of texts"),
    ("POST", "/v2/models/{model}/infer", "the Open Inference Protocol (JSON or binary tensors)"),
    ("GET", "/v2/models/{model}", "model metadata: version, labels, variant, providers"),
    ("GET", "/v2/models/{model}/config", "Triton's model configuration"),
    ("GET", "/v2/models/{model}/stats", "Triton's inference statistics"),
    ("GET", "/v2/health/ready", "readiness, and whether the traffic log is degraded"),
    ("GET", "/v2", "server metadata and protocol extensions"),
    ("GET", "/metrics", "Prometheus metrics"),
    ("GET", "/docs", "interactive API docs (Swagger UI, served locally)"),
]


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)


def landing_page(
    model_name: str,
    version: str,
    labels: list[str],
    variant: str,
    providers: list[str],
    following: dict[str, Any] | None,
    base_url: str,
) -> str:
    """What is served, from which stage, on what, and a request to copy."""
    if following is None:
        stage = "a fixed export (not following a registry stage)"
    else:
        sync = (
            '<span class="ok">in sync</span>'
            if following["in_sync"]
            else f'<span class="warn">wants {escape(str(following["version"]))}: '
            f"{escape(str(following['problem'] or 'swap pending'))}</span>"
        )
        stage = f"follows <b>{escape(str(following['stage']))}</b>, {sync}"
    body = json.dumps({"texts": EXAMPLE_TEXTS}, ensure_ascii=False)
    curl = (
        f"curl -s {base_url}/v1/predict \\\n  -H 'content-type: application/json' \\\n  -d '{body}'"
    )
    endpoints = "".join(
        f"<tr><td><code>{method}</code></td>"
        f"<td><code>{escape(path.replace('{model}', model_name))}</code></td>"
        f"<td>{escape(what)}</td></tr>"
        for method, path, what in ENDPOINTS
    )
    facts = _rows(
        [
            ("version", f"<code>{escape(version)}</code>"),
            ("stage", stage),
            ("labels", escape(", ".join(labels))),
            ("variant", escape(variant)),
            ("providers", escape(", ".join(providers))),
        ]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>lmops — {escape(model_name)} {escape(version)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{escape(model_name)} <small>{escape(version)}</small></h1>
<p class="sub">lmops prediction server: a text classifier on ONNX Runtime</p>
<table>{facts}</table>
<h2>Try it</h2>
<pre id="curl">{escape(curl)}</pre>
<h2>Endpoints</h2>
<table><tr><th>method</th><th>path</th><th>what</th></tr>{endpoints}</table>
<p><a href="docs">API docs</a> · <a href="metrics">metrics</a></p>
</body></html>
"""
