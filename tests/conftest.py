"""Shared fixtures: the repository's own params, and small real data from the builtins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmops.config import (
    Params,
    apply_overrides,
    override,
    parse_params,
    profile_overrides,
    resolve_overrides,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent

# Every test is in exactly one family (markers; `make test-<family>`). A test that names none
# takes its folder's; tests/unit/test_families.py holds every collected test to one.
FAMILIES = ("code", "data", "model", "faults", "e2e")
FOLDER_FAMILIES = {
    "unit": "code",
    "integration": "code",
    "faults": "faults",
    "conformance": "e2e",
    "e2e": "e2e",
}
COLLECTED_FAMILIES = pytest.StashKey[dict[str, list[str]]]()
# Fixtures that ingest the builtin data, train a model or start a server (10 s and more each
# on 2 busy cores): a test that needs one, however indirectly, is `slow`, left out of
# `make test-fast`. A test as slow by itself is marked where it is written.
SLOW_FIXTURES = {"tiny_validated", "tiny_export", "served", "prefect_server"}


def families(item: pytest.Item) -> list[str]:
    """The families a test names, on itself, its class or its module."""
    return sorted({mark.name for mark in item.iter_markers() if mark.name in FAMILIES})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Folder families and `slow` first (tryfirst: before `-m` deselects anything), then every
    collected test's families, selected or not, kept for tests/unit/test_families.py."""
    tests_dir = REPO_ROOT / "tests"
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker("slow")
        if not families(item) and item.path.is_relative_to(tests_dir):
            folder = item.path.relative_to(tests_dir).parts[0]
            if folder in FOLDER_FAMILIES:
                item.add_marker(FOLDER_FAMILIES[folder])
    config.stash[COLLECTED_FAMILIES] = {item.nodeid: families(item) for item in items}


@pytest.fixture(scope="session")
def repo_params_raw() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


def params_with(raw: dict[str, Any], **dotted: Any) -> Params:
    """The repository's params with dotted-key overrides (`data__max_rows=100`)."""
    return parse_params(override(raw, {k.replace("__", "."): v for k, v in dotted.items()}))


def tool_env(**extra: str) -> dict[str, str]:
    """The environment a subprocess of this venv needs: its scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {"DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    )
    env.update(extra)
    return env


def copy_project(dest: Path) -> Path:
    """Copy what git would ship (tracked and untracked-not-ignored files) into `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = REPO_ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def tiny_git_project(dest: Path) -> Path:
    """The project in `dest` as a fresh git repo, the tiny profile applied and committed;
    registrations push to a DVC remote beside it (not the user's ~/.cache)."""
    root = copy_project(dest)
    git(root, "init", "-q")
    remote = dest.parent / f"{dest.name}-dvc-remote"
    apply_overrides(root, resolve_overrides(root, "tiny", [f"registry.remote={remote}"]))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project under test")
    return root


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=lmops-tests", "-c", "user.email=tests@lmops.invalid", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: equal digests mean nothing was touched."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 120) -> bool:
    """Poll `url` until it answers 200: False once `process` exits or time runs out."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real Prefect server on a free loopback port with its own PREFECT_HOME."""
    import signal

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = tool_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN_DIR / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if not wait_healthy(f"{api_url}/health", server):
        server.kill()
        pytest.fail(f"Prefect server did not start:\n{(home / 'server.log').read_text()}")
    yield {"api_url": api_url, "env": {**env, "PREFECT_API_URL": api_url}}
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def latest_artifact(api_url: str, key: str) -> dict[str, Any]:
    """The newest Prefect artifact with this key (the session's server is shared)."""
    import httpx

    response = httpx.post(
        f"{api_url}/artifacts/filter",
        json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
        timeout=30,
    )
    response.raise_for_status()
    (artifact,) = response.json()
    return artifact


def tiny_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """The repository's params with the `tiny` profile applied."""
    return override(raw, profile_overrides(REPO_ROOT, "tiny"))


@pytest.fixture(scope="session")
def tiny_validated(repo_params_raw: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Validated-shape tables from a real ingest of the tiny profile's sample."""
    from lmops.tasks import ingest

    root = tmp_path_factory.mktemp("tiny-data")
    params = parse_params(tiny_raw(repo_params_raw))
    ingest.run(params.data, root, root / "validated", root / "ingest.json")
    return root / "validated"


def without_base(root: Path) -> None:
    """What the base stage writes with `model.init_from: null` (the tiny profile), for a
    test that runs the later stages in `root` on their own."""
    from lmops.artifacts import BaseManifest
    from lmops.stages import BASE_DIR

    BaseManifest(kind="none").write(root / BASE_DIR / BaseManifest.FILE)


def build_tiny_classifier(
    raw: dict[str, Any], validated: Path, root: Path, architecture: str = "bert", seed: int = 0
) -> dict[str, Path]:
    """Tokenizer, pretrained LM and fine-tuned classifier of the tiny profile, in `root`."""
    from lmops.tasks import finetune, pretrain, tokenizer

    params = params_with(
        tiny_raw(raw), model__architecture=architecture, pretrain__seed=seed, finetune__seed=seed
    )
    dirs = {name: root / name for name in ("tokenizer", "pretrained", "finetuned")}
    tokenizer.run(params.tokenizer, params.model, validated, dirs["tokenizer"], root / "t.json")
    pretrain.run(
        params.pretrain,
        params.model,
        dirs["tokenizer"],
        validated,
        dirs["pretrained"],
        root / "tokens",
        root / "ckpt",
        root / "live",
        root / "p.json",
    )
    finetune.run(
        params.finetune,
        params.model,
        dirs["tokenizer"],
        dirs["pretrained"],
        validated,
        validated,  # the labels stage's training rows: all of them
        dirs["finetuned"],
        root / "ft-live",
        root / "ft.json",
    )
    return dirs


@pytest.fixture(scope="session")
def tiny_export(
    repo_params_raw: dict, tiny_validated: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], Path]:
    """`tiny_export(seed)`: the ONNX export (a models/onnx folder) of a tiny classifier trained
    from that seed, built once per session; different seeds give different answers."""
    from lmops.tasks import export

    built: dict[int, Path] = {}

    def get(seed: int) -> Path:
        if seed not in built:
            root = tmp_path_factory.mktemp(f"tiny-export-seed{seed}")
            dirs = build_tiny_classifier(repo_params_raw, tiny_validated, root, seed=seed)
            params = params_with(tiny_raw(repo_params_raw))
            export.run(
                params.export,
                params.model,
                dirs["finetuned"],
                tiny_validated,
                root / "onnx",
                root / "triton",
            )
            built[seed] = root / "onnx"
        return built[seed]

    return get


def start_server(
    command: list[str],
    cwd: Path,
    port: int,
    log: Path,
    preexec_fn: Callable[[], Any] | None = None,
    env: dict[str, str] | None = None,
    ca: Path | None = None,
) -> subprocess.Popen:
    """Start a server process (its output to `log`) and wait until /v2/health/ready says so
    (over https, trusting `ca`, when given one)."""
    import time

    import httpx

    with log.open("w", encoding="utf-8") as output:
        server = subprocess.Popen(
            command,
            cwd=cwd,
            env=env or tool_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited:\n{log.read_text('utf-8')}")
        scheme = "http" if ca is None else "https"
        ready = f"{scheme}://127.0.0.1:{port}/v2/health/ready"
        try:
            if httpx.get(ready, timeout=1, verify=str(ca) if ca else True).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    pytest.fail(f"server did not become ready in 60 s:\n{log.read_text('utf-8')}")


def stop_server(server: subprocess.Popen) -> int:
    """SIGTERM, as an orchestrator stops it: the exit status of a graceful shutdown. A second
    SIGTERM skips the drain period (serve.drain_seconds), which tests/faults checks."""
    import time

    server.terminate()
    time.sleep(0.2)
    if server.poll() is None:
        server.terminate()
    try:
        return server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        raise


def traffic_record(text: str, when: Any, **fields: Any) -> str:
    """One line of the traffic log, through the record the server writes (`when`: aware
    datetime)."""
    from lmops.artifacts import TrafficRecord

    defaults = {"request_id": "r", "label": "positive", "score": 0.9, "latency_ms": 1.0}
    return TrafficRecord(
        timestamp=when, model_version="v-test", text=text, **{**defaults, **fields}
    ).line()


def write_traffic(folder: Path, texts: list[str], when: Any = None) -> Path:
    """Append `texts` to `folder`'s traffic log file for the hour of `when` (default: now)."""
    from datetime import UTC, datetime

    when = when or datetime.now(UTC)
    folder.mkdir(parents=True, exist_ok=True)
    from lmops.artifacts import traffic_file_name

    with (folder / traffic_file_name(when)).open("a", encoding="utf-8") as handle:
        handle.writelines(traffic_record(text, when) + "\n" for text in texts)
    return folder


def serving_workspace(tiny_export: Callable[[int], Path], root: Path) -> Path:
    shutil.copytree(tiny_export(0), root / "models" / "onnx")
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    return root


def serve(
    root: Path,
    preexec_fn: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
    ca: Path | None = None,
) -> tuple[str, subprocess.Popen]:
    """`lmops serve` in `root` on a free port, ready: (base URL, process); https when the
    workspace's serve.tls is set and `ca` signed its certificate."""
    port = free_port()
    process = start_server(
        [sys.executable, "-m", "lmops", "serve", "--port", str(port)],
        root,
        port,
        root / "server.log",
        preexec_fn=preexec_fn,
        env=env,
        ca=ca,
    )
    return f"{'http' if ca is None else 'https'}://127.0.0.1:{port}", process


def run_lmops(
    root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`lmops ARGS` in `root` as a user runs it, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "lmops", *args],
        cwd=root,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serve_stage(root: Path, log: Path, stage: str = "prod") -> tuple[str, subprocess.Popen]:
    """`lmops serve --stage STAGE` in `root` on a free port, ready: (base URL, process)."""
    port = free_port()
    process = start_server(
        [sys.executable, "-m", "lmops", "serve", "--stage", stage, "--port", str(port)],
        root,
        port,
        log,
    )
    return f"http://127.0.0.1:{port}", process


@pytest.fixture(scope="session")
def served(
    tiny_export: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """One `lmops serve` process on the tiny export for every test that leaves it serving:
    (URL, workspace)."""
    root = serving_workspace(tiny_export, tmp_path_factory.mktemp("served"))
    url, process = serve(root)
    yield url, root
    stop_server(process)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """One headless Chromium tab (tests/browser.py) for a browser test."""
    from tests.browser import Page

    opened = Page(tmp_path)
    yield opened
    opened.close()


GUARD_KEYS = {
    "alice": "alice-key-0123456789abcdef",  # every group
    "bob": "bob-key-0123456789abcdef",  # every group; the rate-limit test's caller
    "ci": "ci-key-0123456789abcdef",  # inference only (from the keys file)
    "dana": "dana-key-0123456789abcdef",  # every group; lmops feedback --url's caller
}
GUARD_FEEDBACK_PER_MINUTE = 5


def set_params(root: Path, **dotted: Any) -> None:
    """Write dotted-key overrides (`serve__auth__restricted=[...]`) into `root`/params.yaml."""
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    changed = override(raw, {k.replace("__", "."): v for k, v in dotted.items()})
    path.write_text(yaml.safe_dump(changed, allow_unicode=True), encoding="utf-8")


@pytest.fixture(scope="session")
def guarded(
    tiny_export: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """`lmops serve` with every restrictable group behind keys: alice, bob and dana from
    $LMOPS_API_KEYS, ci (inference only) from serve.auth.keys_file. (URL, workspace)."""
    root = serving_workspace(tiny_export, tmp_path_factory.mktemp("guarded"))
    keys_file = root / "api-keys"
    keys_file.write_text(f"# name key groups\nci {GUARD_KEYS['ci']} inference\n")
    keys_file.chmod(0o600)
    set_params(
        root,
        serve__auth__restricted=["inference", "feedback", "pages", "metrics"],
        serve__auth__keys_file="api-keys",
        serve__auth__rate_limits__feedback=GUARD_FEEDBACK_PER_MINUTE,
    )
    listed = ",".join(f"{name}={GUARD_KEYS[name]}" for name in ("alice", "bob", "dana"))
    url, process = serve(root, env=tool_env(LMOPS_API_KEYS=listed))
    yield url, root
    stop_server(process)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {GUARD_KEYS[name]}"}
