"""The model registry: GTO's git tags over the DVC artifact `lmops` (models/onnx in dvc.yaml).

A version is a tag `lmops@vX.Y.Z` on the commit whose dvc.lock holds that export; a stage
assignment is a tag `lmops#STAGE#N`. Every tag's message is a JSON record of who did it
(a user or a flow run), why, and the metrics it was judged on, so `lmops models --history`
reads the whole story from git alone. GTO enforces no stage order; `assign` does.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmops.artifacts import CorruptArtifact, Metrics, PromotionRecord, key_figures
from lmops.errors import LmopsError
from lmops.stages import ERRORS, METRICS, MODEL_CARD, PLOTS_DIR

log = logging.getLogger(__name__)

ARTIFACT = "lmops"
REGISTRY_STAGES = ("staging", "prod")
# Where registered versions are fetched to (from DVC's cache) for serving and promotion.
MATERIALIZED_DIR = Path("models/registry")
# What a registration commits beside dvc.lock: the params it ran with and the reports
# dvc.yaml keeps in git (metrics, plots, training curves, model card).
REGISTERED_PATHS = ("params.yaml", "dvc.lock", "reports")
FALLBACK_IDENTITY = ("lmops", "lmops@localhost")


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LmopsError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip()}")
    return result


def is_git_repo(root: Path) -> bool:
    return _git(root, "rev-parse", "--is-inside-work-tree", check=False).returncode == 0


def head_commit(root: Path) -> str | None:
    """The commit checked out in `root`, or None outside git (or before a first commit)."""
    result = _git(root, "rev-parse", "HEAD", check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _configured(root: Path, key: str) -> str | None:
    value = _git(root, "config", key, check=False).stdout.strip()
    return value or None


@contextmanager
def _identity(root: Path) -> Iterator[tuple[str, str]]:
    """The git identity for registry commits and tags: the user's when configured, else
    lmops's own (a fresh machine often has none, and git then refuses to commit)."""
    name = _configured(root, "user.name") or FALLBACK_IDENTITY[0]
    email = _configured(root, "user.email") or FALLBACK_IDENTITY[1]
    keys = ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(dict(zip(keys, (name, email, name, email), strict=True)))
    try:
        yield name, email
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def user_actor() -> str:
    return f"user:{getpass.getuser()}"


def _require_git(root: Path) -> None:
    if not is_git_repo(root):
        raise LmopsError(f"{root} is not a git repository: the registry keeps versions as git tags")


def _versions_raw(root: Path) -> list[dict[str, Any]]:
    import gto.api
    from gto.exceptions import ArtifactNotFound

    _require_git(root)
    try:
        return gto.api.show(str(root), ARTIFACT, table=False)
    except ArtifactNotFound:  # nothing registered yet
        return []


def version_at(root: Path, commit: str) -> str | None:
    return next((v["version"] for v in _versions_raw(root) if v["commit_hexsha"] == commit), None)


def commit_of(root: Path, version: str) -> str:
    for entry in _versions_raw(root):
        if entry["version"] == version:
            return entry["commit_hexsha"]
    known = ", ".join(v["version"] for v in _versions_raw(root)) or "none registered"
    raise LmopsError(f"unknown version {version!r} of {ARTIFACT} (known: {known})")


def read_at(root: Path, commit: str, path: Path | str) -> str | None:
    """A git-tracked file as of `commit`, or None where it did not exist."""
    result = _git(root, "show", f"{commit}:{path}", check=False)
    return result.stdout if result.returncode == 0 else None


def picture_at(root: Path, commit: str, name: str) -> bytes | None:
    """A PNG of reports/plots as of `commit` (registration commits the reports), or None."""
    if not name.endswith(".png") or "/" in name:
        return None
    result = subprocess.run(
        ["git", "show", f"{commit}:{PLOTS_DIR / name}"], cwd=root, capture_output=True
    )
    return result.stdout if result.returncode == 0 else None


def pictures_at(root: Path, commit: str) -> list[str]:
    """The names of the PNGs in reports/plots as of `commit`."""
    listed = _git(root, "ls-tree", "--name-only", f"{commit}:{PLOTS_DIR}", check=False)
    return sorted(n for n in listed.stdout.split() if n.endswith(".png"))


def metrics_at(root: Path, commit: str) -> Metrics | None:
    """reports/metrics.json as of `commit`, or None where that commit has none."""
    text = read_at(root, commit, METRICS)
    return Metrics.parse(text, f"{METRICS} at {commit[:12]}") if text else None


def register(root: Path, by: str, summary: str, remote: str) -> tuple[str, bool]:
    """Commit dvc.lock, params and reports (if they changed), push the data and models to
    the DVC remote (`remote`: registry.remote, see ensure_remote), and tag that commit as a
    new version. Returns (version, newly registered): a commit already tagged keeps its
    version. A failed push registers nothing."""
    import gto.api

    _require_git(root)
    paths = [p for p in REGISTERED_PATHS if (root / p).exists()]
    with _identity(root) as (name, email):
        _git(root, "add", "--", *paths)
        if _git(root, "diff", "--cached", "--quiet", "--", *paths, check=False).returncode:
            _git(
                root,
                "commit",
                "-q",
                "-m",
                f"lmops: register model ({by})\n\n{summary}",
                "--",
                *paths,
            )
        head = _git(root, "rev-parse", "HEAD").stdout.strip()
        existing = version_at(root, head)
        if existing:
            return existing, False
        push(root, remote)
        gto.api.register(
            str(root),
            ARTIFACT,
            head,
            message=PromotionRecord(
                by=by, why=summary, metrics=key_figures(metrics_at(root, head))
            ).message(),
            author=name,
            author_email=email,
        )
    return latest_version(root), True


def latest_version(root: Path) -> str:
    import gto.api

    latest = gto.api.find_latest_version(str(root), ARTIFACT)
    if latest is None:
        raise LmopsError(f"no version of {ARTIFACT} is registered in {root}")
    return latest.version


def stage_version(root: Path, stage: str) -> str | None:
    """The version a stage points at now (resolved through GTO's `NAME#STAGE` shortcut,
    which honours a rollback's --force reassignment)."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    _require_git(root)
    try:
        found = gto.api.show(str(root), f"{ARTIFACT}#{stage}", table=False)
    except ArtifactNotFound:
        return None
    return found[0]["version"] if found else None


def history(root: Path) -> list[dict[str, Any]]:
    """Every registration and stage assignment, oldest first, with its parsed record."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    _require_git(root)
    try:
        events = gto.api.history(str(root), ARTIFACT, ascending=True, table=False)
    except ArtifactNotFound:
        return []
    # Tags made within one second tie on time; GTO's `#N` counter orders assignments.
    events = sorted(events, key=lambda e: (e["timestamp"], _tag_number(e["ref"])))
    return [
        {
            "when": event["timestamp"].isoformat(),
            "event": event["event"],
            "version": event["version"],
            "stage": event["stage"],
            "commit": event["commit"],
            "tag": event["ref"],
            **PromotionRecord.from_message(event["message"] or "").dump(),
        }
        for event in events
        if event["event"] in ("registration", "assignment")
    ]


def _tag_number(ref: str) -> int:
    tail = ref.rsplit("#", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def versions(root: Path) -> list[dict[str, Any]]:
    """Every registered version, newest first, with its active stages and test metrics."""
    active = {stage: stage_version(root, stage) for stage in REGISTRY_STAGES}
    rows = []
    for entry in _versions_raw(root):
        if not entry["registrations"]:
            continue
        registration = entry["registrations"][0]
        rows.append(
            {
                "version": entry["version"],
                "commit": entry["commit_hexsha"],
                "registered": registration["created_at"].isoformat(),
                "by": PromotionRecord.from_message(registration["message"] or "").by,
                "stages": [stage for stage in REGISTRY_STAGES if active[stage] == entry["version"]],
                **_listed_figures(root, entry["version"], entry["commit_hexsha"]),
            }
        )
    return sorted(rows, key=lambda row: _semver(row["version"]), reverse=True)


def version_page(root: Path, version: str) -> dict[str, Any]:
    """What a version's page shows, all read from git: its registration, stages and
    history, its metrics (and prod's, to compare), its model card and its pictures."""
    listed = {row["version"]: row for row in versions(root)}
    if version not in listed:
        known = ", ".join(listed) or "none registered"
        raise LmopsError(f"unknown version {version!r} of {ARTIFACT} (known: {known})")
    row = listed[version]
    commit = row["commit"]
    prod = next((v for v, r in listed.items() if "prod" in r["stages"]), None)

    def readable_metrics(at: str) -> Metrics | None:
        try:
            return metrics_at(root, at)
        except CorruptArtifact:
            return None  # listed without figures (an older format): shown as such

    return {
        **row,
        "history": [e for e in history(root) if e["version"] == version],
        "metrics": readable_metrics(commit),
        "prod": prod,
        "prod_metrics": None
        if prod in (None, version)
        else readable_metrics(listed[prod]["commit"]),
        "card": read_at(root, commit, MODEL_CARD),
        "errors": read_at(root, commit, ERRORS),
        "pictures": pictures_at(root, commit),
    }


def _listed_figures(root: Path, version: str, commit: str) -> dict[str, Any]:
    """A version's figures for the listing. One registered by an older lmops, whose
    metrics.json predates today's format, is still listed, its figures blank (gating it
    still refuses it, naming the field)."""
    try:
        return key_figures(metrics_at(root, commit))
    except CorruptArtifact as err:
        log.warning("registry: %s is listed without figures: %s", version, err)
        return key_figures(None)


def _semver(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.lstrip("v").split(".") if part.isdigit())


def assign(
    root: Path,
    version: str,
    stage: str,
    by: str,
    why: str,
    metrics: dict[str, Any] | None = None,
    force: bool = False,
) -> None:
    """Point `stage` at `version`. A version reaches prod only after it has been in staging.
    A version the stage held before (rolled back from, then earning it again) gets a new
    assignment: GTO refuses that unless forced."""
    import gto.api

    if stage not in REGISTRY_STAGES:
        raise LmopsError(f"unknown stage {stage!r} (stages: {', '.join(REGISTRY_STAGES)})")
    commit_of(root, version)
    if stage == "prod" and not any(
        e["event"] == "assignment" and e["stage"] == "staging" and e["version"] == version
        for e in history(root)
    ):
        raise LmopsError(
            f"{version} has never been in staging: a version reaches prod only after staging"
        )
    with _identity(root) as (name, email):
        gto.api.assign(
            str(root),
            ARTIFACT,
            stage,
            version=version,
            message=PromotionRecord(by=by, why=why, metrics=metrics or {}).message(),
            force=force or stage_version(root, stage) != version,
            author=name,
            author_email=email,
        )


def previous_prod(root: Path) -> str | None:
    """The prod version before the current one, by the order of prod assignments."""
    current = stage_version(root, "prod")
    earlier = [
        e["version"] for e in history(root) if e["event"] == "assignment" and e["stage"] == "prod"
    ]
    while earlier and earlier[-1] == current:
        earlier.pop()
    return earlier[-1] if earlier else None


def _fetch_once(target: Path, what: str, fetch: Callable[[str], Any]) -> Path:
    """`fetch(out)` into a scratch path renamed into place: a reader never sees a partial
    copy, and of two processes fetching the same thing one copy wins. (DVC nests its
    download inside an existing folder, so the scratch path must not exist yet.)"""
    if target.is_dir():
        return target
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        fetch(str(scratch))
    except Exception as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise LmopsError(
            f"cannot fetch {what} from DVC (in the cache or a remote?): {err}"
        ) from err
    try:
        os.replace(scratch, target)
    except OSError:  # another process fetched it first
        shutil.rmtree(scratch, ignore_errors=True)
    return target


REMOTE_NAME = "lmops"


def ensure_remote(root: Path, url: str) -> str:
    """The DVC remote versions are pushed to and pulled from: the repository's default
    remote when it has one, else `url` (registry.remote) added as `lmops` to
    .dvc/config.local, which stays on this machine. A local path is made absolute
    (~ expanded, relative to the project)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        default = repo.config["core"].get("remote")
        if default:
            return default
        if "://" not in url:
            url = str((root / Path(url).expanduser()).resolve())
        with repo.config.edit("local") as conf:
            conf["remote"][REMOTE_NAME] = {"url": url}
            conf["core"]["remote"] = REMOTE_NAME
    return REMOTE_NAME


def push(root: Path, url: str) -> str:
    """Push the workspace's data and models (the version being registered) to the remote;
    returns the remote's name. A remote that refuses is the caller's LmopsError."""
    from dvc.repo import Repo

    name = ensure_remote(root, url)
    try:
        with Repo(str(root)) as repo:
            repo.push(remote=name)
    except Exception as err:
        raise LmopsError(
            f"cannot push the version's data and models to DVC remote {name!r}: {err}"
        ) from err
    return name


def materialize(root: Path, version: str, refetch: bool = False) -> Path:
    """The version's export as a local folder, fetched once from DVC's cache (or remote);
    `refetch` drops a local copy first (one that failed its checksum)."""
    from dvc.repo.artifacts import Artifacts

    commit_of(root, version)  # an unknown version is the user's error, not DVC's
    if refetch:
        shutil.rmtree(root / MATERIALIZED_DIR / version, ignore_errors=True)
    return _fetch_once(
        root / MATERIALIZED_DIR / version,
        f"{ARTIFACT} {version}",
        lambda out: Artifacts.get(str(root), ARTIFACT, version=version, out=out),
    )


def materialize_data(root: Path, version: str, path: Path) -> Path:
    """A DVC-tracked folder (e.g. data/validated) as of the version's commit, fetched once."""
    from dvc.repo import Repo

    commit = commit_of(root, version)
    return _fetch_once(
        root / MATERIALIZED_DIR / f"{version}.{path.name}",
        f"{path} of {version}",
        lambda out: Repo.get(str(root), str(path), out=out, rev=commit),
    )


def stage_resolver(root: Path, stage: str) -> Callable[[], tuple[str, Path]]:
    """What a server polls: the version `stage` points at now, and where its export is
    fetched to (by the loader, so that a failed fetch is a failed swap, retried with
    backoff, while the version the stage wants stays known)."""
    if stage not in REGISTRY_STAGES:
        raise LmopsError(f"unknown stage {stage!r} (stages: {', '.join(REGISTRY_STAGES)})")

    def resolve() -> tuple[str, Path]:
        version = stage_version(root, stage)
        if version is None:
            raise LmopsError(f"no version of {ARTIFACT} is in {stage} (run `lmops promote` first)")
        return version, root / MATERIALIZED_DIR / version

    return resolve


def earlier_in_stage(root: Path, stage: str) -> list[str]:
    """Versions that were once assigned to `stage`, the most recent assignment first (the
    fallbacks a server may start on when the stage's own version cannot load)."""
    seen: list[str] = []
    for event in reversed(history(root)):
        assigned = event["event"] == "assignment" and event["stage"] == stage
        if assigned and event["version"] not in seen:
            seen.append(event["version"])
    return seen
