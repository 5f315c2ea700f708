"""The validation Data Docs in a real browser (Debian's headless Chromium, tests/browser.py),
offline: the real validate stage runs twice on the tiny profile's data, and the site it
publishes must list both runs, be styled and scripted by the copies lmops/datadocs.py
vendors, show the expectations in words, never make a passing class share read as a
failure, and load nothing from anywhere but this machine. GX's own pages ask CDNs for all of
it, so the offline check is not vacuous."""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from lmops import datadocs
from lmops.config import parse_params
from lmops.errors import LmopsError
from lmops.tasks import validate
from tests.browser import Page
from tests.conftest import tiny_raw, tree_digest

pytestmark = pytest.mark.browser

RESULT_LINKS = "[...document.querySelectorAll('#Validation-Results tbody a')]"
# Bootstrap's spacing utility on GX's page body (3rem); nothing else sets it.
STYLED = "getComputedStyle(document.querySelector('.container-fluid.pl-5')).paddingLeft === '48px'"
FONT_AWESOME = (
    "[...document.fonts].some(f => f.family.includes('Font Awesome') && f.status === 'loaded')"
)
# The observed value of every expectation the page marks as passed.
PASSED_ROWS = (
    "[...document.querySelectorAll('tr')].filter(r => r.querySelector('.fa-check-circle'))"
    ".map(r => r.innerText)"
)


def _validate(raw: dict, ingested: Path, root: Path) -> Path:
    cfg = parse_params(tiny_raw(raw)).validation
    validate.run(cfg, ingested, root / "validated", root / "docs", root / "q", root / "v.json")
    return root / "docs"


def _eventually(page: Page, ready: str, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not page.evaluate(ready):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _missing_local_files(page: Page) -> list[str]:
    """Every file the page asked for that is not there (a missing copy fails quietly)."""
    asked = [unquote(urlparse(u).path) for u in page.requests if u.startswith("file://")]
    return [path for path in asked if not Path(path).is_file()]


def test_data_docs_list_every_run_and_read_offline(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path, page: Page
) -> None:
    _validate(repo_params_raw, tiny_validated, tmp_path)
    docs = _validate(repo_params_raw, tiny_validated, tmp_path)
    pages = sorted(p.relative_to(docs).as_posix() for p in (docs / "validations").rglob("*.html"))
    runs = {Path(p).parent.name for p in pages}
    assert len(runs) == 2 and len(pages) == 2 * len(validate.TABLES + ("splits_disjoint",))

    page.open((docs / "index.html").as_uri(), f"{RESULT_LINKS}.length > 0")
    linked = page.evaluate(f"{RESULT_LINKS}.map(a => a.getAttribute('href'))")
    assert sorted(h for h in linked if h.startswith("validations/")) == pages
    assert page.evaluate(STYLED), "the index is not styled by the vendored Bootstrap"
    assert page.evaluate(FONT_AWESOME), "the status icons' font did not load"
    # The tabs switch by Bootstrap's script on jQuery: both vendored, both working.
    page.evaluate("document.getElementById('Expectation-Suites-tab').click()")
    suites = "[...document.querySelectorAll('#Expectation-Suites.active tbody a')]"
    assert _eventually(page, f"{suites}.length === 5")

    latest = max(runs)
    for relative in (p for p in pages if f"/{latest}/" in p):
        page.open((docs / relative).as_uri(), "document.querySelector('.fa-check-circle')")
        text = page.evaluate("document.body.innerText")
        assert re.search(r"Status:\s*Succeeded", text) and "values must be unique." in text
        for row in page.evaluate(PASSED_ROWS):
            # "0% unexpected" is honest; a share of other rows shown as unexpected is not.
            assert not re.search(r"[1-9][\d.]*% unexpected|Unexpected Values", row), row
        assert page.evaluate(STYLED), f"{relative} is not styled by the vendored Bootstrap"
        if "lmops-train" in relative:
            assert "values must never be null." in text
            assert re.search(
                r"At least \d+% of the rows \([\d,]+ of [\d,]+\) are labelled 'negative'", text
            )
    assert page.images_loaded()
    assert _missing_local_files(page) == []
    assert page.remote_requests() == []
    # Rewriting the pages again changes nothing: earlier runs' pages are rewritten each run.
    before = tree_digest(docs)
    datadocs.make_offline(docs)
    assert tree_digest(docs) == before


def test_a_missing_vendored_asset_is_named_and_the_last_docs_kept(
    repo_params_raw: dict,
    tiny_validated: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = _validate(repo_params_raw, tiny_validated, tmp_path)
    good = tree_digest(docs)
    lost = datadocs.Asset("xstatic-jquery", "xstatic.pkg.jquery", "data/jquery.gone.js", "j.js")
    monkeypatch.setattr(datadocs, "ASSETS", (*datadocs.ASSETS, lost))
    with pytest.raises(LmopsError, match=r"data/jquery\.gone\.js of xstatic-jquery is not"):
        _validate(repo_params_raw, tiny_validated, tmp_path)
    assert tree_digest(docs) == good
    # A package that is not there at all is named the same way.
    absent = datadocs.Asset("xstatic-gone", "xstatic.pkg.gone", "data/x.js", "x.js")
    monkeypatch.setattr(datadocs, "ASSETS", (absent,))
    with pytest.raises(LmopsError, match=r"data/x\.js of xstatic-gone is not installed"):
        datadocs.vendor(tmp_path / "site")


def test_gx_pages_ask_cdns_without_the_rewrite(
    repo_params_raw: dict,
    tiny_validated: Path,
    tmp_path: Path,
    page: Page,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(validate, "make_offline", lambda site: None)
    docs = _validate(repo_params_raw, tiny_validated, tmp_path)
    page.open((docs / "index.html").as_uri(), "true")
    assert any("bootstrap" in url for url in page.remote_requests())
    assert page.evaluate(f"{RESULT_LINKS}.length") == 0  # bootstrap-table never drew it
