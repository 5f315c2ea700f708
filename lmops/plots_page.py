"""The HTML template `dvc plots show` fills: Vega, Vega-Lite and Vega-Embed inline, offline.

DVC's own page puts <script src="https://cdn.jsdelivr.net/..."> tags where its template says
`{scripts}`, so offline its Vega plots stay blank. This template has no `{scripts}` and
carries the three libraries itself, bundled by vl-convert-python (about 0.9 MB of JavaScript,
`vegaEmbed` a global as DVC's plot divs expect). It is generated from the installed package by
`make install` (`python -m lmops.plots_page PATH`) rather than kept in git, and the committed
`.dvc/config` points `plots.html_template` at it."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

from lmops.errors import LmopsError

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh}
    <title>DVC Plot</title>
    <!-- {versions}, inline: written by `python -m lmops.plots_page` -->
    <script type="text/javascript">
(function () {{
"use strict";
{bundle}
}})();
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plots}
</body>
</html>
"""


def vega_lite_version() -> str:
    """The newest Vega-Lite vl-convert offers in the major version of dvc_render's templates
    (their `$schema`), so a plot compiles as the spec says it was written."""
    import vl_convert
    from dvc_render.vega_templates import TEMPLATES

    schema = TEMPLATES[0].DEFAULT_CONTENT["$schema"]
    major = re.search(r"/v(\d+)\.json$", schema).group(1)
    offered = [v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == major]
    if not offered:
        raise LmopsError(f"vl-convert-python offers no Vega-Lite {major}.x (DVC's {schema})")
    return max(offered, key=lambda v: tuple(int(part) for part in v.split(".")))


def render_template() -> str:
    try:
        import vl_convert
    except ImportError:
        raise LmopsError(
            "vl-convert-python is not installed (a dependency in pyproject.toml: make install)"
        ) from None
    from dvc_render.html import HTML

    version = vega_lite_version()
    # The default snippet assigns window.vegaEmbed (called by each of DVC's plot divs),
    # window.vega and window.vegaLite; the function scope keeps the rest off the globals.
    bundle = vl_convert.javascript_bundle(vl_version=version)
    placeholders = [
        "{" + name + "}"
        for name in (HTML.SCRIPTS_PLACEHOLDER, HTML.PLOTS_PLACEHOLDER, HTML.REFRESH_PLACEHOLDER)
    ]
    # DVC fills the template by plain string replacement, and the HTML parser ends the inline
    # script at the first "</script": either inside the bundle would break the page.
    clash = [text for text in placeholders if text in bundle]
    clash += ["</script"] if "</script" in bundle.lower() else []
    if clash:
        raise LmopsError(f"vl-convert's JavaScript bundle contains {clash}: cannot inline it")
    versions = (
        f"Vega {vl_convert.get_vega_version()}, Vega-Lite {version}, "
        f"Vega-Embed {vl_convert.get_vega_embed_version()}"
    )
    return PAGE.format(
        refresh="{" + HTML.REFRESH_PLACEHOLDER + "}",
        versions=versions,
        bundle=bundle,
        plots=HTML.PLOTS_PLACEHOLDER_FORMAT_STR,
    )


def write_template(path: Path) -> Path:
    """Write the template to `path` (its folder made if missing), atomically: a half-written
    template would make a page whose plots silently stay blank."""
    page = render_template()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        why = f"{err.strerror}: {err.filename}" if err.filename else str(err)
        raise LmopsError(f"cannot write the `dvc plots show` template to {path} ({why})") from None
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmops.plots_page",
        description="Write the HTML template that lets `dvc plots show` render offline "
        "(.dvc/config's plots.html_template names it).",
    )
    parser.add_argument("path", type=Path, help="where to write the template")
    args = parser.parse_args(argv)
    try:
        write_template(args.path)
    except LmopsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
