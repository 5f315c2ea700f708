"""What lmops's own HTTP clients (`lmops models --url`, `lmops simulate-traffic`,
`lmops feedback --url`) send to a server whose endpoint groups need a key."""

from __future__ import annotations

import os

KEY_ENV = "LMOPS_API_KEY"


def api_headers() -> dict[str, str]:
    """`Authorization: Bearer $LMOPS_API_KEY`, or nothing where it is unset. An https
    server's certificate is checked against $SSL_CERT_FILE where set (httpx reads it)."""
    key = os.environ.get(KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}
