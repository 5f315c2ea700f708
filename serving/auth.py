"""Who may call what: endpoint groups behind named bearer keys, in the spirit of Triton's
restricted APIs (`--http-restricted-api=<group>:<header>=<value>`), and per-key rate
limits on the costly writes.

A restricted group needs `Authorization: Bearer KEY` (the header tritonclient's `headers=`
and the KServe SDK pass through): 401 without one, 403 with a key that is not known or not
allowed that group. Keys are named; only their SHA-256 digests are held, and a presented
key is compared with every digest in constant time. Neither a key nor its digest is ever
logged or stored: the feedback log keeps the key's *name*.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from lmops.config import ENDPOINT_GROUPS, AuthConfig
from lmops.errors import ConfigError

KEYS_ENV = "LMOPS_API_KEYS"
MIN_KEY_CHARS = 16
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def group_of(path: str) -> str:
    """The endpoint group a request path belongs to (health is never restricted)."""
    if path.startswith("/v2/health/"):
        return "health"
    if path.startswith("/v2/models/"):
        if path.endswith("/stats"):
            return "metrics"
        if path.endswith("/ready"):
            return "health"
        return "inference"
    if path in ("/v1/predict", "/v1/explain", "/v2"):
        return "inference"
    if path == "/v1/feedback":
        return "feedback"
    if path == "/metrics":
        return "metrics"
    return "pages"


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes
    groups: frozenset[str] = field(default=frozenset(ENDPOINT_GROUPS))


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _key(name: str, secret: str, groups: frozenset[str], where: str) -> Key:
    if not _NAME.match(name):
        raise ConfigError(f"{where}: a key's name is letters, digits and _.@- (got {name!r})")
    if len(secret) < MIN_KEY_CHARS:
        raise ConfigError(
            f"{where}: key {name!r} is shorter than {MIN_KEY_CHARS} characters "
            "(`lmops keys new NAME` makes a strong one)"
        )
    return Key(name, _digest(secret), groups)


def _from_env(value: str) -> list[Key]:
    keys = []
    for number, item in enumerate(filter(None, (i.strip() for i in value.split(","))), 1):
        name, sep, secret = item.partition("=")
        if not sep:
            raise ConfigError(f'{KEYS_ENV}: item {number} is not NAME=KEY ("alice=KEY1,ci=KEY2")')
        keys.append(_key(name.strip(), secret.strip(), frozenset(ENDPOINT_GROUPS), KEYS_ENV))
    return keys


def _from_file(path: Path) -> list[Key]:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"serve.auth.keys_file: no file at {path}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"serve.auth.keys_file: {path} can be read by others (mode {stat.filemode(mode)}); "
            f"`chmod 600 {path}`"
        )
    keys = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        where = f"serve.auth.keys_file {path}:{number}"
        if len(parts) not in (2, 3):
            raise ConfigError(f"{where}: a line is `name key` or `name key group,group`")
        groups = frozenset(ENDPOINT_GROUPS)
        if len(parts) == 3:
            groups = frozenset(parts[2].split(","))
            if unknown := sorted(groups - set(ENDPOINT_GROUPS)):
                raise ConfigError(
                    f"{where}: unknown group(s) {unknown} (known: {', '.join(ENDPOINT_GROUPS)})"
                )
        keys.append(_key(parts[0], parts[1], groups, where))
    return keys


def load_keys(cfg: AuthConfig, root: Path, environ: Mapping[str, str] = os.environ) -> list[Key]:
    """The keys from $LMOPS_API_KEYS and serve.auth.keys_file; a name or a key given twice
    is refused (which of two keys would a record name?)."""
    keys = _from_env(environ.get(KEYS_ENV, ""))
    if cfg.keys_file is not None:
        keys += _from_file(root / cfg.keys_file)
    names = [k.name for k in keys]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"API key name(s) {twice} are given more than once")
    if len({k.digest for k in keys}) < len(keys):
        raise ConfigError("the same API key is given under two names")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: AuthConfig, keys: list[Key], host: str) -> None:
    """Refuse a server that anyone could steer: restricted groups with no key to open
    them, or a reachable port with feedback (the next training run's data) open."""
    if cfg.restricted and not keys:
        raise ConfigError(
            f"serve.auth.restricted is {cfg.restricted} but no key is set: "
            f'export {KEYS_ENV}="name=KEY" or set serve.auth.keys_file'
        )
    if "feedback" not in cfg.restricted and not cfg.allow_open_feedback and not is_loopback(host):
        raise ConfigError(
            f"serving on {host} would let anyone who reaches it write training labels "
            f'(POST /v1/feedback): export {KEYS_ENV}="name=KEY" and '
            "--set 'serve.auth.restricted=[feedback]', or --set serve.auth.allow_open_feedback=true"
        )


class RateLimiter:
    """A token bucket per (group, caller): `per_minute` requests a minute, bursts up to
    that many. Returns the seconds to wait, 0 when the request may go."""

    def __init__(self, per_minute: int) -> None:
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}

    def wait(self, caller: str, now: float) -> float:
        tokens, last = self.buckets.get(caller, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self.buckets[caller] = (tokens - 1, now)
            return 0.0
        self.buckets[caller] = (tokens, now)
        return (1 - tokens) / self.rate


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


class ApiKeys:
    """ASGI middleware: the key check of restricted groups, then the rate limits. The
    caller's key name goes into `request.state.api_key` (None where the group is open)."""

    def __init__(self, app: Any, cfg: AuthConfig, keys: list[Key]) -> None:
        self.app, self.keys, self.restricted = app, keys, frozenset(cfg.restricted)
        limits = {"/v1/feedback": cfg.rate_limits.feedback, "/v1/explain": cfg.rate_limits.explain}
        self.limiters = {path: RateLimiter(n) for path, n in limits.items() if n > 0}

    def _find(self, secret: str) -> Key | None:
        presented, found = _digest(secret), None
        for key in self.keys:  # no early exit: the time does not tell which key was close
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found

    def _check(self, scope: dict, group: str) -> tuple[str | None, JSONResponse | None]:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, secret = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None, _refuse(
                401,
                f"the {group} endpoints need a key: send `Authorization: Bearer KEY` "
                "(serve.auth.restricted)",
                {"WWW-Authenticate": 'Bearer realm="lmops"'},
            )
        key = self._find(secret.strip())
        if key is None:
            return None, _refuse(403, "the key is not valid")
        if group not in key.groups:
            return None, _refuse(403, f"key {key.name!r} may not use the {group} endpoints")
        return key.name, None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, name = scope["path"], None
        if self.restricted:
            group = group_of(path)
            if group in self.restricted:
                name, refused = self._check(scope, group)
                if refused is not None:
                    return await refused(scope, receive, send)
        if (limiter := self.limiters.get(path)) is not None:
            client = scope.get("client")
            caller = name or f"address {client[0] if client else '?'}"
            if (wait := limiter.wait(caller, time.monotonic())) > 0:
                seconds = math.ceil(wait)
                refused = _refuse(
                    429,
                    f"over serve.auth.rate_limits for {path} "
                    f"({limiter.capacity:g} a minute); retry in {seconds} s",
                    {"Retry-After": str(seconds)},
                )
                return await refused(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = name
        return await self.app(scope, receive, send)
