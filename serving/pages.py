"""The server's own pages: a landing page at `/` that says what is served and how to call
it, the registry's index at `/models`, and one page per registered version.

Plain HTML with its styles inline and pictures from the server itself: nothing is loaded
from anywhere else, so the pages work on a machine with no network. The interactive docs
(`/docs`) come from fastapi-offline, which serves Swagger UI's files from the package.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import PurePath
from typing import Any

# Texts to try, in the language of the builtin data the served labels come from (the
# English default, else the Chinese reviews').
EXAMPLE_TEXTS = ["A wonderful, moving film.", "Dull, lifeless and far too long."]
EXAMPLE_TEXTS_ZH = ["质量很好，非常满意", "太差了，再也不买了"]


def example_texts(labels: list[str]) -> list[str]:
    return EXAMPLE_TEXTS_ZH if labels == ["negative", "positive"] else EXAMPLE_TEXTS


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 58rem;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } .sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6rem 0 1.2rem; }
td, th { border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem 0.3rem 0; text-align: left;
         vertical-align: top; }
code, pre { font-family: ui-monospace, monospace; background: #f4f4f4; }
pre { padding: 0.8rem; overflow-x: auto; }
.ok { color: #1a7f37; } .warn { color: #b35900; } .bad { color: #b3261e; }
td.n, th.n { text-align: right; } img { max-width: 100%; border: 1px solid #eee; }
.pictures img { width: 27rem; margin: 0 0.5rem 0.5rem 0; vertical-align: top; }
.token { padding: 0.1rem 0.05rem; border-radius: 2px; }
.explanation { font-size: 1.3rem; }
.card { border-left: 3px solid #ddd; padding-left: 1rem; }
"""

# The landing page's explanation: the text laid out as it was sent, each token a span
# whose colour's strength is its weight relative to the largest.
EXPLAIN_SCRIPT = """
document.getElementById('explain-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const out = document.getElementById('explanation');
  const text = document.getElementById('explain-text').value;
  const response = await fetch('v1/explain', {method: 'POST',
    headers: {'content-type': 'application/json'}, body: JSON.stringify({text})});
  const answer = await response.json();
  if (!response.ok) { out.textContent = answer.error; return; }
  const top = Math.max(1e-9, ...answer.tokens.map(t => Math.abs(t.weight)));
  const label = document.createElement('b');
  label.textContent = `${answer.label} (${answer.score.toFixed(3)}, ${answer.model_version}): `;
  const parts = [label];
  let at = 0;
  for (const token of answer.tokens) {
    parts.push(document.createTextNode(text.slice(at, token.start)));
    const span = document.createElement('span');
    span.className = 'token';
    span.textContent = text.slice(token.start, token.end);
    span.title = `${token.token}: ${token.weight}`;
    const strength = (Math.abs(token.weight) / top).toFixed(3);
    span.style.background = token.weight >= 0 ? `rgba(26,127,55,${strength})`
                                               : `rgba(179,38,30,${strength})`;
    parts.push(span);
    at = token.end;
  }
  parts.push(document.createTextNode(text.slice(at)));
  out.replaceChildren(...parts);
});
"""

ENDPOINTS = [
    ("POST", "/v1/predict", "labels and probabilities for a list of texts"),
    ("POST", "/v1/explain", "why: each token's weight for the predicted label (occlusion)"),
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
    examples = example_texts(labels)
    body = json.dumps({"texts": examples}, ensure_ascii=False)
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
<h2>Why? An explanation</h2>
<form id="explain-form"><input id="explain-text" size="44" value="{escape(examples[0])}">
<button>Explain</button></form>
<p id="explanation" class="explanation"></p>
<p class="sub">Each token coloured by how much the predicted label's probability falls
without it (<span style="background:rgba(26,127,55,.5)">for the label</span>,
<span style="background:rgba(179,38,30,.5)">against it</span>): <code>POST /v1/explain</code>,
occlusion on the served engine.</p>
<script>{EXPLAIN_SCRIPT}</script>
<h2>Endpoints</h2>
<table><tr><th>method</th><th>path</th><th>what</th></tr>{endpoints}</table>
<p><a href="docs">API docs</a> · <a href="models">registered models</a> ·
<a href="metrics">metrics</a></p>
</body></html>
"""


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{escape(title)}</title>
<style>{STYLE}</style></head>
<body>
{body}
</body></html>
"""


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _figure(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _passed(passed: bool | None) -> str:
    if passed is None:
        return ""
    return '<span class="ok">passed</span>' if passed else '<span class="bad">failed</span>'


def registry_index(model_name: str, rows: list[dict[str, Any]], serving: str) -> str:
    """Every registered version, newest first: its stages and test figures."""
    body = "".join(
        f'<tr><td><a href="models/{escape(row["version"])}">{escape(row["version"])}</a>'
        f"{' (served here)' if row['version'] == serving else ''}</td>"
        f"<td>{escape(', '.join(row['stages']))}</td>"
        f"<td>{escape(row['registered'][:19].replace('T', ' '))}</td><td>{escape(row['by'])}</td>"
        f"<td class=n>{_figure(row['accuracy'])}</td>"
        f"<td class=n>{_figure(row['baseline_accuracy'])}</td>"
        f"<td>{_passed(row['gates_passed'])}</td></tr>"
        for row in rows
    )
    listing = (
        "<table><tr><th>version</th><th>stages</th><th>registered (UTC)</th><th>by</th>"
        "<th class=n>test accuracy</th><th class=n>baseline</th><th>gates</th></tr>"
        f"{body}</table>"
        if rows
        else "<p>No version is registered yet: <code>make run</code> registers one.</p>"
    )
    return _page(
        f"lmops — {model_name} registry",
        f"<h1>{escape(model_name)} <small>registry</small></h1>"
        '<p class="sub">every registered version (git tags, GTO) · '
        '<a href="./">this server</a></p>' + listing,
    )


def _metrics_table(facts: dict[str, Any]) -> str:
    metrics = facts["metrics"]
    prod, prod_metrics = facts["prod"], facts["prod_metrics"]
    columns = [("this version", metrics.model)]
    if metrics.transformer_only is not None:
        columns.append(("transformer alone", metrics.transformer_only))
    columns.append(("TF-IDF + LR baseline", metrics.baseline))
    if prod_metrics is not None:
        columns.append((f"prod ({prod})", prod_metrics.model))
    head = "".join(f"<th class=n>{escape(name)}</th>" for name, _ in columns)
    rows = "".join(
        f"<tr><th>{key}</th>"
        + "".join(f"<td class=n>{getattr(m, key):.4f}</td>" for _, m in columns)
        + "</tr>"
        for key in ("accuracy", "macro_f1", "roc_auc", "ece")
    )
    slices = "".join(
        f"<tr><th>{escape(name)} chars</th><td class=n>{part.n:,}</td>"
        f"<td class=n>{_figure(part.accuracy)}</td>"
        f"<td class=n>{_figure(metrics.baseline.slices_by_chars[name].accuracy)}</td></tr>"
        for name, part in metrics.model.slices_by_chars.items()
        if name in metrics.baseline.slices_by_chars
    )
    return (
        _markdown(metrics.verdict())
        + f"<table><tr><th>test metric</th>{head}</tr>{rows}</table>"
        + _label_issues(metrics.label_issues)
        + _markdown(f"Gates: {metrics.gates.text()}")
        + "<h3>Accuracy by text length (test)</h3><table><tr><th>slice</th><th class=n>texts"
        f"</th><th class=n>model</th><th class=n>baseline</th></tr>{slices}</table>"
    )


def _label_issues(found: Any) -> str:
    """Accuracy on every test row and on the rows whose label the labels stage trusts."""
    if found is None:
        return ""
    return (
        f"<h3>Label issues (test)</h3><p>{found.test_flagged:,} test rows are flagged as "
        'likely mislabelled (<a href="../reports/labels/">label issues</a>); '
        f"{found.dropped_train_rows:,} flagged training rows were dropped "
        f"(<code>data.label_issues: {escape(found.policy)}</code>). The finder's "
        "probabilities are the baseline's, so the unflagged rows lean towards rows the "
        "baseline gets right: this says how much error sits on doubtful labels, not which "
        "model is better.</p>"
        "<table><tr><th>test accuracy</th><th class=n>this version</th>"
        "<th class=n>TF-IDF + LR baseline</th></tr>"
        f"<tr><th>all test rows</th><td class=n>{found.accuracy_all:.4f}</td>"
        f"<td class=n>{found.baseline_accuracy_all:.4f}</td></tr>"
        f"<tr><th>unflagged test rows</th><td class=n>{found.accuracy_unflagged:.4f}</td>"
        f"<td class=n>{found.baseline_accuracy_unflagged:.4f}</td></tr></table>"
    )


def _history_table(events: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{escape(e['when'][:19].replace('T', ' '))}</td>"
        f"<td>{escape(e['event'])}{' to ' + escape(e['stage']) if e['stage'] else ''}</td>"
        f"<td>{escape(e['by'])}</td><td>{escape(e['why'])}</td>"
        f"<td><code>{escape(e['tag'])}</code></td></tr>"
        for e in events
    )
    return (
        "<table><tr><th>when (UTC)</th><th>event</th><th>by</th><th>why</th><th>tag</th></tr>"
        f"{rows}</table>"
    )


def _promotion_figures(events: list[dict[str, Any]]) -> str:
    """The served variant's figures as the last promotion measured them: its accuracy and
    latency, and each paired comparison against prod with its interval."""
    measured = [e for e in events if "p50_latency_ms" in (e.get("metrics") or {})]
    if not measured:
        return "<p>Not measured yet: a promotion (<code>lmops promote</code>) measures them.</p>"
    event = measured[-1]
    figures = event["metrics"]
    rows = [
        ("test accuracy (served variant)", f"{figures['accuracy']:.4f}"),
        ("test macro-F1", f"{figures['macro_f1']:.4f}"),
        ("median latency, one text", f"{figures['p50_latency_ms']:.3f} ms"),
    ]
    if "cpu_ms_per_1k_texts" in figures:
        rows.append(
            ("serving CPU time", f"{figures['cpu_ms_per_1k_texts']:,.1f} ms per 1,000 texts")
        )
    if cost := figures.get("training_cost"):
        energy = cost.get("energy_kwh")
        rows.append(
            (
                "training cost (ingest to fine-tuning)",
                f"{cost['wall_seconds']:,.1f} s wall, {cost['cpu_seconds']:,.1f} CPU-s, "
                f"{cost['gpu_seconds']:,.1f} GPU-s"
                + (f", {energy * 1000:,.2f} Wh (estimate)" if energy is not None else ""),
            )
        )
    if (live := figures.get("live_evidence")) and live.get("texts"):
        estimated = live["estimated_accuracy"]
        rows.append(
            (
                "live evidence (shadowed beside prod)",
                f"{live['texts']:,} texts since {live['since'].replace('T', ' ')} UTC, "
                f"agreement {live['agreement']:.3f}, estimated accuracy "
                f"{estimated['challenger']:.4f} vs prod {estimated['prod']:.4f}",
            )
        )
    rows += [
        (
            f"{name.replace('_', ' ')}",
            f"{value['difference'] * 100:+.2f} points, {value['confidence']:.0%} CI "
            f"[{value['ci_low'] * 100:+.2f}, {value['ci_high'] * 100:+.2f}] ({value['rule']})",
        )
        for name, value in figures.items()
        if isinstance(value, dict) and "ci_low" in value
    ]
    when = escape(event["when"][:19].replace("T", " "))
    return (
        f"<p>Measured by the {escape(event['event'])} of {when} UTC "
        f"({escape(event['by'])}).</p><table>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _drift(drift: Any, drift_problem: str | None) -> str:
    if drift_problem:
        return f'<p class="warn">{escape(drift_problem)}</p>'
    if drift is None:
        return "<p>No drift check has run here yet (<code>lmops monitor</code>).</p>"
    verdict = (
        '<span class="bad">drift detected</span>'
        if drift.drift_detected
        else '<span class="ok">no drift</span>'
        if drift.status == "ok"
        else f'<span class="warn">{escape(drift.status.replace("_", " "))}</span>'
    )
    # Served by this server under /reports/drift/ (serving/app.py), one folder per run.
    html = (drift.report or {}).get("html")
    run = PurePath(html).parent.name if html else None
    link = f' · <a href="../reports/drift/{escape(run)}/report.html">Evidently report</a>'
    link = link if run else ""
    window = drift.traffic
    return (
        f"<p>{verdict} in the traffic to {escape(drift.model.version)}, checked "
        f"{escape(drift.created_at[:19].replace('T', ' '))} UTC over "
        f"{escape(window.window_start or 'the start')} – {escape(window.window_end)}"
        f"{link}</p>" + (f"<p>{escape(drift.message)}</p>" if drift.message else "")
    )


def _errors(facts: dict[str, Any]) -> str:
    """reports/errors.md without its own title, and the deletion test's figures."""
    check = facts["metrics"].explanations if facts["metrics"] is not None else None
    figures = (
        f"<p>Deletion test on {check.texts} test texts: deleting each text's top-weighted "
        f"{check.deleted_share:.0%} of tokens lowers the label's probability by "
        f"{check.top_tokens_drop:.3f} on average, as many random tokens by "
        f"{check.random_tokens_drop:.3f}; the top tokens moved it more on "
        f"{check.top_drop_larger_share:.0%} of texts.</p>"
        if check is not None
        else ""
    )
    if not facts.get("errors"):
        return figures + "<p>No error analysis at this commit.</p>"
    # Its own "# ..." title gives way to the page's heading.
    return figures + _markdown(facts["errors"].removeprefix("# Most confident mistakes"))


def model_page(
    model_name: str,
    facts: dict[str, Any],
    serving: str,
    drift: Any = None,
    drift_problem: str | None = None,
) -> str:
    """One registered version: stage and history, metrics beside the baseline and prod,
    its pictures, its model card, and the latest drift verdict."""
    version = facts["version"]
    stages = ", ".join(facts["stages"]) or "no stage"
    facts_rows = _rows(
        [
            ("stages", escape(stages)),
            ("commit", f"<code>{escape(facts['commit'])}</code>"),
            ("registered", escape(facts["registered"][:19].replace("T", " ")) + " UTC"),
            ("by", escape(facts["by"])),
            ("served here", "yes" if version == serving else f"no (this server: {serving})"),
            ("serve it", f"<code>lmops serve --stage {escape(facts['stages'][-1])}</code>")
            if facts["stages"]
            else ("serve it", "<code>lmops promote</code> it first"),
        ]
    )
    metrics = (
        _metrics_table(facts)
        if facts["metrics"] is not None
        else "<p class=warn>No readable reports/metrics.json at this commit.</p>"
    )
    pictures = "".join(
        f'<img src="{escape(version)}/plots/{escape(name)}" alt="{escape(name)}">'
        for name in facts["pictures"]
    )
    card = (
        _markdown(facts["card"]).replace('src="plots/', f'src="{escape(version)}/plots/')
        if facts["card"]
        else "<p>No model card at this commit.</p>"
    )
    body = (
        f"<h1>{escape(model_name)} <small>{escape(version)}</small></h1>"
        '<p class="sub"><a href="../models">all versions</a> · <a href="../">this server</a>'
        f"</p><table>{facts_rows}</table>"
        f"<h2>Test metrics</h2>{metrics}"
        f"<h2>Served variant, as promotion measured it</h2>"
        f"{_promotion_figures(facts['history'])}"
        f"<h2>Pictures</h2><div class=pictures>{pictures or '<p>none</p>'}</div>"
        f"<h2>History</h2>{_history_table(facts['history'])}"
        f"<h2>Latest drift check</h2>{_drift(drift, drift_problem)}"
        f"<h2>Model card</h2><div class=card>{card}</div>"
        f"<h2>Most confident mistakes, explained</h2>{_errors(facts)}"
    )
    return _page(f"lmops — {model_name} {version}", body)
