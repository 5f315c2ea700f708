"""Great Expectations' Data Docs, made to read offline.

GX 1.x pages load Bootstrap 4, jQuery, Popper, Font Awesome, bootstrap-table, a datepicker,
a dark theme and Vega from CDNs, and its logo from S3. Offline they come out unstyled, and
the index lists nothing: its tables are drawn by bootstrap-table from rows kept in a script.
`make_offline` rewrites every page of a built site so that no request leaves the machine:

- Bootstrap 4.6 (CSS, and its JS bundle with Popper), jQuery and Font Awesome's solid icons
  are copied from the Python packages that ship them into `static/vendor/`, and each page
  links those instead of the CDNs;
- the index's tables are written out as plain HTML (sorted as GX asks), so bootstrap-table,
  its filter control and the datepicker are not needed; nor is Vega (no chart in our suites);
- the logo and favicon come from the site's own `static/images/`; GX's dark-mode rules,
  made for a dark theme from a CDN, are left out.

It is idempotent, so a site that keeps the pages of earlier runs can be rewritten again.
"""

from __future__ import annotations

import ast
import html
import importlib.resources
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmops.errors import LmopsError

VENDOR_DIR = Path("static/vendor")
IMAGES_DIR = "static/images/"
GX_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
DARK_MODE = "@media (prefers-color-scheme: dark)"


@dataclass(frozen=True)
class Asset:
    """One file copied from an installed package into the site's `static/vendor/`."""

    distribution: str  # what pyproject.toml declares
    package: str  # what holds the file
    path: str  # inside the package
    target: str  # under static/vendor/


# (distribution, package): Bootstrap 4.6.2 (GX asks for 4.3.1), jQuery 3.7.1 (as GX),
# Font Awesome 6.2.1 (GX asks for 6.6.0; its two icons are in both).
BOOTSTRAP = ("django-static-bootstrap", "django_static_bootstrap")
JQUERY = ("xstatic-jquery", "xstatic.pkg.jquery")
FONT_AWESOME = ("xstatic-font-awesome", "xstatic.pkg.font_awesome")
ASSETS = (
    Asset(*BOOTSTRAP, "static/bootstrap/css/bootstrap.min.css", "bootstrap.min.css"),
    # The bundle carries Popper, which GX loads separately.
    Asset(*BOOTSTRAP, "static/bootstrap/js/bootstrap.bundle.min.js", "bootstrap.bundle.min.js"),
    Asset(*JQUERY, "data/jquery.min.js", "jquery.min.js"),
    *(
        # GX draws its status icons with `fas` (solid) only; the CSS finds the fonts at
        # ../webfonts/ beside css/, as in the package.
        Asset(*FONT_AWESOME, f"data/{name}", f"fontawesome/{name}")
        for name in (
            "css/fontawesome.min.css",
            "css/solid.min.css",
            "webfonts/fa-solid-900.woff2",
            "webfonts/fa-solid-900.ttf",
        )
    ),
)
STYLESHEETS = (
    "bootstrap.min.css",
    "fontawesome/css/fontawesome.min.css",
    "fontawesome/css/solid.min.css",
)
SCRIPTS = ("jquery.min.js", "bootstrap.bundle.min.js")

_REMOTE = r"""["'](?:https?:)?//[^"']+["']"""
REMOTE_LINK = re.compile(rf"<link\b[^>]*\bhref={_REMOTE}[^>]*>\s*", re.I)
REMOTE_SCRIPT = re.compile(rf"<script\b[^>]*\bsrc={_REMOTE}[^>]*>\s*</script>\s*", re.I)
GX_IMAGE = re.compile(re.escape(GX_IMAGES) + r"""([\w.-]+)(?:\?[^"']*)?""")
LOCAL_IMAGE = re.compile(r"""(?<=["'])(?:\.\./)*static/images/""")
# What GX's bootstrap_table.j2 writes: an empty <table> and a script that fills it from
# Python reprs of the columns, the rows and the options.
EMPTY_TABLE = r"""<table\s+id="{id}"(?P<attrs>[^>]*?)\s*data-toggle="table"\s*>\s*</table>"""
TABLE_SCRIPT = re.compile(
    r"<script>\s*\$\('#(?P<id>[^']+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*"
    r"columns:\s*(?P<columns>\[.*?\]),\s*data:\s*(?P<rows>\[.*?\]),\s*toolbar:\s*'[^']*'\s*\},"
    r"\s*(?P<options>\{.*?\})\s*\)\s*\);.*?</script>",
    re.S,
)
TABLE_TAG = re.compile(r"<table\b[^>]*data-toggle=\"table\"[^>]*>")
FILTER_BUTTON = re.compile(r"<button\b[^>]*clearTableFilters[^>]*>.*?</button>\s*", re.S)


def vendor(site_dir: Path) -> None:
    """Copy every asset into `site_dir/static/vendor/`; a missing one is named with its
    package, not left for the browser to find out."""
    for asset in ASSETS:
        try:
            source = importlib.resources.files(asset.package).joinpath(asset.path)
        except ModuleNotFoundError:
            source = None
        if source is None or not source.is_file():
            raise LmopsError(
                f"Data Docs: {asset.path} of {asset.distribution} is not installed (a "
                f"dependency in pyproject.toml: make install)"
            )
        target = site_dir / VENDOR_DIR / asset.target
        target.parent.mkdir(parents=True, exist_ok=True)
        with importlib.resources.as_file(source) as path:
            shutil.copyfile(path, target)


def make_offline(site_dir: Path) -> None:
    """Vendor the assets, then rewrite every page of the site built in `site_dir`."""
    vendor(site_dir)
    for page in sorted(site_dir.rglob("*.html")):
        root = "../" * (len(page.relative_to(site_dir).parts) - 1)
        text = page.read_text("utf-8")
        offline = offline_page(text, root)
        if offline != text:
            page.write_text(offline, "utf-8")


def offline_page(text: str, root: str) -> str:
    """One page with no request leaving the machine; `root` leads from it to the site's."""
    vendored = f"{root}{VENDOR_DIR.as_posix()}/"
    text = _replace_all(
        REMOTE_LINK,
        "".join(f'<link rel="stylesheet" href="{vendored}{name}">\n' for name in STYLESHEETS),
        text,
    )
    text = _replace_all(
        REMOTE_SCRIPT,
        "".join(f'<script src="{vendored}{name}"></script>\n' for name in SCRIPTS),
        text,
    )

    def local_image(match: re.Match[str]) -> str:
        return f"{root}{IMAGES_DIR}{match.group(1)}"

    # GX's templates point the logo at S3, and the favicon of a validation page one folder
    # short of the site's root: both are in the site's own static/images/.
    text = GX_IMAGE.sub(local_image, text)
    text = LOCAL_IMAGE.sub(f"{root}{IMAGES_DIR}", text)
    text = FILTER_BUTTON.sub("", _without_dark_mode(text))
    return TABLE_TAG.sub(_plain_table_tag, _static_tables(text))


def _replace_all(pattern: re.Pattern[str], replacement: str, text: str) -> str:
    """The first match becomes `replacement` (so the order of the page's styles and scripts
    is kept), the others go."""
    first = pattern.search(text)
    if first is None:
        return text
    rest = pattern.sub("", text[first.end() :])
    return text[: first.start()] + replacement + rest


def _without_dark_mode(text: str) -> str:
    """GX's dark-mode rules go with the dark Bootstrap theme it loads from a CDN, which no
    package ships: without it they darken the tables of a light page and swap the logo for
    one on S3. The page stays light instead."""
    start = text.find(DARK_MODE)
    while start >= 0:
        depth = 0
        for end in range(text.index("{", start), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:start] + text[end + 1 :]
        start = text.find(DARK_MODE)
    return text


def _static_tables(text: str) -> str:
    """Each table GX's script would have drawn, written into its empty <table>."""
    bodies = {}
    for script in TABLE_SCRIPT.finditer(text):
        try:
            columns, rows, options = (
                ast.literal_eval(script[part]) for part in ("columns", "rows", "options")
            )
        except (SyntaxError, ValueError) as err:
            raise LmopsError(
                f"Data Docs: table {script['id']} is not in the form GX 1.x was known to "
                f"write ({err})"
            ) from None
        bodies[script["id"]] = _table_content(columns, rows, options)
    text = TABLE_SCRIPT.sub("", text)
    for table_id, content in bodies.items():
        empty = re.compile(EMPTY_TABLE.format(id=re.escape(table_id)))
        text = empty.sub(
            lambda table, c=content, i=table_id: (
                f'<table id="{i}"{table["attrs"]} data-toggle="table">{c}</table>'
            ),
            text,
        )
    return text


def _plain_table_tag(tag: re.Match[str]) -> str:
    """A table bootstrap-table would have restyled keeps Bootstrap's own look instead."""
    opening = tag.group(0).replace('data-toggle="table"', "")
    if not re.search(r"""class="(?:[^"]*\s)?table[\s"]""", opening):
        opening = opening.replace('class="', 'class="table ', 1)
    return opening


def _table_content(columns: list[dict[str, Any]], rows: list[dict[str, Any]], options: dict) -> str:
    if options.get("sortName"):
        field = options["sortName"]
        by = next((c.get("sortName", field) for c in columns if c["field"] == field), field)
        rows = sorted(
            rows, key=lambda row: row.get(by, ""), reverse=options.get("sortOrder") == "desc"
        )
    head = "".join(f"<th>{html.escape(str(c.get('title', c['field'])))}</th>" for c in columns)
    body = []
    for row in rows:
        link = row.get("_table_row_link_path")
        cells = []
        for column in columns:
            value = str(row.get(column["field"], ""))
            # The first cell of plain text links the row's page (bootstrap-table made the
            # whole row clickable by script).
            if link and "<" not in value:
                value = f'<a href="{html.escape(link, quote=True)}">{html.escape(value)}</a>'
                link = None
            align = ' class="text-center"' if column.get("align") == "center" else ""
            cells.append(f"<td{align}>{value}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
