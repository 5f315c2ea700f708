"""Personal data in text: find it and replace each match with a typed placeholder.

Kinds: mainland-China mobile numbers (PHONE), resident identity numbers with a valid
checksum (ID), bank card numbers that pass Luhn (CARD), e-mail addresses (EMAIL) and IPv4
or IPv6 addresses (IP). The patterns are anchored on digits and ASCII, not on words, so
they work in Chinese and English text alike (Chinese has no spaces around a number).
Checksums come from python-stdnum and addresses are checked by `ipaddress`, so a random
18-digit order number is not an ID and 999.1.1.1 is not an address.

Why here and not Presidio: its recognisers are English-centric (word boundaries, English
context words); these five kinds are numbers and addresses, where a checksum is the signal.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable

KINDS = ("ID", "PHONE", "CARD", "EMAIL", "IP")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ric(text: str) -> bool:
    from stdnum.cn import ric

    return ric.is_valid(text)


def _is_card(text: str) -> bool:
    from stdnum import luhn

    digits = re.sub(r"[ -]", "", text)
    return 16 <= len(digits) <= 19 and luhn.is_valid(digits)


# In priority order: a span taken by one kind is not matched again by a later one (an ID
# number that happens to pass Luhn is an ID; "+86 138 1234 5678" is a phone).
_PATTERNS: list[tuple[str, re.Pattern[str], Callable[[str], bool] | None]] = [
    ("ID", re.compile(r"(?<![0-9A-Za-z])\d{17}[0-9Xx](?![0-9A-Za-z])"), _is_ric),
    ("PHONE", re.compile(r"(?<![0-9A-Za-z+])(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)"), None),
    # 16-19 digits (mainland bank cards), not inside a decimal number: statistics tables in
    # news text hold long digit runs, one in ten of which passes Luhn by chance.
    ("CARD", re.compile(r"(?<![0-9A-Za-z.])\d(?:[ -]?\d){15,18}(?![0-9A-Za-z]|\.\d)"), _is_card),
    (
        "EMAIL",
        re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
        None,
    ),
    ("IP", re.compile(r"(?<![0-9.])(?:\d{1,3}\.){3}\d{1,3}(?![0-9.])"), _is_ip),
    # IPv6: with a decimal digit somewhere, so that words such as std::bad are not taken.
    (
        "IP",
        re.compile(r"(?<![0-9A-Za-z:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![0-9A-Za-z:])"),
        lambda text: any(c.isdigit() for c in text) and _is_ip(text),
    ),
]


def find(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every match, in text order, none overlapping."""
    found: list[tuple[str, int, int]] = []
    for kind, pattern, valid in _PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(start < e and s < end for _, s, e in found):
                continue
            if valid is None or valid(match.group()):
                found.append((kind, start, end))
    return sorted(found, key=lambda hit: hit[1])


def redact(text: str) -> tuple[str, Counter[str]]:
    """The text with each match replaced by `[KIND]`, and the count of each kind."""
    hits = find(text)
    if not hits:
        return text, Counter()
    parts, at = [], 0
    for kind, start, end in hits:
        parts += [text[at:start], f"[{kind}]"]
        at = end
    parts.append(text[at:])
    return "".join(parts), Counter(kind for kind, _, _ in hits)


def count(texts: Iterable[str]) -> Counter[str]:
    """How many matches of each kind the texts hold."""
    total: Counter[str] = Counter()
    for text in texts:
        total.update(kind for kind, _, _ in find(text))
    return total
