"""`dvc plots show` renders offline: the real dvc CLI writes the page from the template
`make install` generates (lmops/plots_page.py), and headless Chromium (tests/browser.py)
draws every Vega plot and the picture with no request leaving the machine. Without the
template the same page asks a CDN, so the offline check is not vacuous."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmops.plots_page import write_template
from tests.browser import Page
from tests.conftest import BIN_DIR, REPO_ROOT, git, tool_env

pytestmark = pytest.mark.browser

VEGA_PLOTS = 3  # the dvc.yaml below: the confusion matrix, the ROC curve, the loss curve
# DVC writes each Vega plot as <div id="ID"><script>vegaEmbed('#ID', spec)</script></div>;
# Vega-Embed replaces the script with the drawing (an svg or canvas of class "marks").
EMBEDDED = re.compile(r"vegaEmbed\('#([^']+)'")
DRAWN = (
    "[...document.querySelectorAll('.vega-embed')]"
    ".filter(d => d.querySelector('svg.marks, canvas.marks')?.clientWidth > 0).map(d => d.id)"
)
DVC_YAML = """\
plots:
  - loss.png
  - confusion.json:
      template: confusion
      x: predicted
      y: actual
  - roc.json:
      x: fpr
      y: tpr
  - Training loss:
      x: step
      y:
        loss.tsv: loss
"""


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "dvc"), *args],
        cwd=root,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=check,
    )


def project_template_setting() -> str:
    """`plots.html_template` as the committed .dvc/config sets it (relative to .dvc/)."""
    return dvc(REPO_ROOT, "config", "--project", "plots.html_template").stdout.strip()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One template for the module, written as `make install` writes it (about 2 s)."""
    return write_template(tmp_path_factory.mktemp("template") / "dvc-plots-template.html")


def plots_repo(root: Path) -> Path:
    """A git + DVC repo whose dvc.yaml plots a confusion matrix, a ROC curve, a TSV loss
    curve and a PNG, all small files written here."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    root.mkdir()
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    pairs = [("pos", "pos"), ("pos", "neg"), ("neg", "neg"), ("neg", "neg")]
    confusion = [{"actual": a, "predicted": p} for a, p in pairs]
    (root / "confusion.json").write_text(json.dumps(confusion), "utf-8")
    roc = [{"fpr": x, "tpr": y} for x, y in [(0, 0), (0.1, 0.6), (0.4, 0.9), (1, 1)]]
    (root / "roc.json").write_text(json.dumps(roc), "utf-8")
    losses = [2.0, 1.2, 0.8, 0.6]
    rows = "".join(f"{step}\t{loss}\n" for step, loss in enumerate(losses))
    (root / "loss.tsv").write_text(f"step\tloss\n{rows}", "utf-8")
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot(losses)
    figure.savefig(root / "loss.png")
    plt.close(figure)
    (root / "dvc.yaml").write_text(DVC_YAML, "utf-8")
    return root


def configure_like_the_project(root: Path, template: Path) -> Path:
    """The committed setting in this repo's .dvc/config, the template where it points."""
    setting = project_template_setting()
    dvc(root, "config", "--project", "plots.html_template", setting)
    target = root / ".dvc" / setting
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, target)
    return target


def show(root: Path) -> Path:
    """Plain `dvc plots show`, as a user runs it; the page it wrote."""
    dvc(root, "plots", "show")
    return root / "dvc_plots" / "index.html"


def test_dvc_plots_show_draws_every_plot_offline(
    template: Path, page: Page, tmp_path: Path
) -> None:
    root = plots_repo(tmp_path / "repo")
    configure_like_the_project(root, template)
    index = show(root)
    embedded = EMBEDDED.findall(index.read_text("utf-8"))
    assert len(embedded) == VEGA_PLOTS

    page.open(index.as_uri(), f"{DRAWN}.length === {VEGA_PLOTS} && document.images.length")
    assert sorted(page.evaluate(DRAWN)) == sorted(embedded)
    assert page.evaluate("document.images.length") == 1
    assert page.images_loaded()
    assert page.remote_requests() == []


def test_without_the_template_the_page_asks_a_cdn(page: Page, tmp_path: Path) -> None:
    root = plots_repo(tmp_path / "repo")
    index = show(root)

    assert len(EMBEDDED.findall(index.read_text("utf-8"))) == VEGA_PLOTS

    page.open(index.as_uri(), "document.images.length")
    remote = page.remote_requests()
    assert remote and all(url.startswith("https://cdn.jsdelivr.net/") for url in remote)
    assert page.evaluate(f"{DRAWN}.length") == 0  # offline, not a plot drew


def test_a_missing_template_fails_dvc_plots_show_instead_of_a_blank_page(
    tmp_path: Path,
) -> None:
    """DVC reads a template path that is not a file as the template text itself, which then
    lacks `{plot_divs}`: it fails (its words, not ours) and writes no page."""
    root = plots_repo(tmp_path / "repo")
    dvc(root, "config", "--project", "plots.html_template", project_template_setting())

    shown = dvc(root, "plots", "show", check=False)
    assert shown.returncode != 0
    assert "HTML template has to contain '{plot_divs}'" in shown.stderr
    assert not (root / "dvc_plots" / "index.html").exists()


def test_an_unwritable_template_path_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "venv"
    blocker.write_text("a file where the folder should be", "utf-8")
    target = blocker / "dvc-plots-template.html"

    written = subprocess.run(
        [str(BIN_DIR / "python"), "-m", "lmops.plots_page", str(target)],
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert written.returncode == 1
    assert written.stderr.splitlines() == [
        f"error: cannot write the `dvc plots show` template to {target} (File exists: {blocker})"
    ]
    assert "Traceback" not in written.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["venv"]


def test_make_install_writes_the_template_where_dvc_config_points() -> None:
    """The Makefile's path and the committed .dvc/config's must name the same file."""
    recipe = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", ".venv/.installed-stamp"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    written = re.search(r"-m lmops\.plots_page (\S+)", recipe)
    assert written, recipe
    configured = (REPO_ROOT / ".dvc" / project_template_setting()).resolve()
    assert (REPO_ROOT / written.group(1)).resolve() == configured
