"""serving/auth.py without a server: which group a path is in, where keys come from and
when they are refused, the open-feedback guard and the rate limiter's arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmops.config import AuthConfig
from lmops.errors import ConfigError
from lmops.serving.auth import RateLimiter, check_exposure, group_of, load_keys

KEY = "k" * 20


def _auth(**changes: object) -> AuthConfig:
    base = {
        "restricted": [],
        "keys_file": None,
        "allow_open_feedback": False,
        "rate_limits": {"feedback": 600, "explain": 120},
    }
    return AuthConfig.model_validate({**base, **changes})


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/v1/predict", "inference"),
        ("/v1/explain", "inference"),
        ("/v2", "inference"),
        ("/v2/models/lmops", "inference"),
        ("/v2/models/lmops/versions/v1/infer", "inference"),
        ("/v2/models/lmops/config", "inference"),
        ("/v1/feedback", "feedback"),
        ("/metrics", "metrics"),
        ("/v2/models/lmops/stats", "metrics"),
        ("/v2/models/lmops/versions/v1/stats", "metrics"),
        ("/v2/health/live", "health"),
        ("/v2/health/ready", "health"),
        ("/v2/models/lmops/ready", "health"),
        ("/", "pages"),
        ("/models/v0.0.1", "pages"),
        ("/reports/experiments/", "pages"),
        ("/docs", "pages"),
        ("/openapi.json", "pages"),
        ("/no/such/path", "pages"),
    ],
)
def test_every_path_has_its_group(path: str, group: str) -> None:
    assert group_of(path) == group


def test_keys_from_the_environment(tmp_path: Path) -> None:
    keys = load_keys(_auth(), tmp_path, {"LMOPS_API_KEYS": f"alice={KEY}, ci={KEY}x"})
    assert [k.name for k in keys] == ["alice", "ci"]
    assert all(KEY.encode() not in k.digest for k in keys)  # held as digests only


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"alice{KEY}", "is not NAME=KEY"),
        ("alice=short", "shorter than 16"),
        (f"al ice={KEY}", "a key's name"),
        (f"a={KEY},a={KEY}y", "more than once"),
        (f"a={KEY},b={KEY}", "under two names"),
    ],
)
def test_bad_keys_are_refused_without_showing_them(
    tmp_path: Path, value: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as refused:
        load_keys(_auth(), tmp_path, {"LMOPS_API_KEYS": value})
    assert KEY not in str(refused.value)


def test_a_keys_file_is_private_and_may_limit_groups(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\nlabeller {KEY} feedback\nops {KEY}z\n")
    path.chmod(0o600)
    keys = load_keys(_auth(keys_file="keys"), tmp_path, {})
    assert {k.name: sorted(k.groups) for k in keys} == {
        "labeller": ["feedback"],
        "ops": ["feedback", "inference", "metrics", "pages"],
    }
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="can be read by others"):
        load_keys(_auth(keys_file="keys"), tmp_path, {})
    path.chmod(0o600)
    path.write_text(f"ops {KEY} inference,admin\n")
    with pytest.raises(ConfigError, match=r"unknown group\(s\) \['admin'\]"):
        load_keys(_auth(keys_file="keys"), tmp_path, {})
    with pytest.raises(ConfigError, match="no file at"):
        load_keys(_auth(keys_file="missing"), tmp_path, {})


def test_feedback_open_to_the_network_is_refused(tmp_path: Path) -> None:
    keys = load_keys(_auth(), tmp_path, {"LMOPS_API_KEYS": f"a={KEY}"})
    for loopback in ("127.0.0.1", "::1", "localhost"):
        check_exposure(_auth(), [], loopback)
    with pytest.raises(ConfigError, match="write training labels"):
        check_exposure(_auth(), keys, "0.0.0.0")
    check_exposure(_auth(restricted=["feedback"]), keys, "0.0.0.0")
    check_exposure(_auth(allow_open_feedback=True), [], "10.0.0.5")
    with pytest.raises(ConfigError, match="no key is set"):
        check_exposure(_auth(restricted=["metrics"]), [], "127.0.0.1")


def test_the_rate_limiter_refills_by_the_minute() -> None:
    limiter = RateLimiter(per_minute=2)
    assert [limiter.wait("a", 0.0), limiter.wait("a", 0.0)] == [0.0, 0.0]
    assert limiter.wait("a", 0.0) == pytest.approx(30.0)  # one token comes back per 30 s
    assert limiter.wait("b", 0.0) == 0.0  # callers are counted apart
    assert limiter.wait("a", 30.0) == 0.0
    assert limiter.wait("a", 31.0) > 0
