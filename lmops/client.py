"""lmops's own HTTP clients of a running server (`lmops models --url`, `lmops
simulate-traffic`, `lmops feedback --url`): the key they send where endpoint groups need
one, and the feedback sender."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmops.feedback import Verdict

KEY_ENV = "LMOPS_API_KEY"


def api_headers() -> dict[str, str]:
    """`Authorization: Bearer $LMOPS_API_KEY`, or nothing where it is unset. An https
    server's certificate is checked against $SSL_CERT_FILE where set (httpx reads it)."""
    key = os.environ.get(KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def send_feedback(url: str, items: list[tuple[str, list[str]]]) -> list[Verdict]:
    """POST each (request id, labels) to `{url}/v1/feedback`: the server's verdict for each.
    A 429 is waited out (its Retry-After) and sent again; a server that cannot be reached,
    or refuses the key, stops the lot with one line."""
    import time

    import httpx

    from lmops.errors import LmopsError
    from lmops.feedback import Verdict

    verdicts = []
    with httpx.Client(base_url=url, headers=api_headers(), timeout=60) as client:
        for request_id, labels in items:
            while True:
                try:
                    answer = client.post(
                        "/v1/feedback", json={"request_id": request_id, "labels": labels}
                    )
                except httpx.TransportError as err:
                    raise LmopsError(f"cannot reach the server at {url}: {err}") from None
                if answer.status_code != 429:
                    break
                time.sleep(float(answer.headers.get("retry-after", "1")))
            if answer.status_code in (401, 403):
                raise LmopsError(
                    f"{url}/v1/feedback answered {answer.status_code}: {_reason(answer)} "
                    f"(set ${KEY_ENV})"
                )
            detail = "stored" if answer.status_code == 200 else _reason(answer)
            verdicts.append(Verdict(request_id, answer.status_code, detail))
    return verdicts


def _reason(answer: Any) -> str:
    try:
        return str(answer.json().get("error", answer.text))
    except ValueError:
        return answer.text
