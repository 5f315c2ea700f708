"""Delayed labels: the true labels of served requests, arriving later, joined to the
traffic log by request id (`POST /v1/feedback`, `lmops feedback FILE`).

A request's records are found in the traffic log (newest first: a client that reused an
id labels its latest request). Feedback that names no logged request, gives another count
of labels than the request had texts, or a label the model does not know is refused for
that id with the reason; every other item is appended to `<traffic dir>/feedback.jsonl`,
whose newest line per id wins. Nothing accepted is ever dropped, nothing refused is
silently ignored.

The monitor joins the window's records with these labels for the *realized* accuracy, and
`lmops feedback --export` writes the labelled traffic as a CSV that `data.source` accepts,
each label beside the one the model served and the key that wrote it: the validate stage
holds each key's labels to the feedback contract before anything is trained on them.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmops.artifacts import FeedbackRecord, TrafficRecord, traffic_files

if TYPE_CHECKING:
    import pandas as pd

FEEDBACK_FILE = "feedback.jsonl"
_append_lock = threading.Lock()


@dataclass(frozen=True)
class Verdict:
    """What became of one item: 200 stored, 404 no such request, 422 labels do not fit."""

    request_id: str
    status: int
    detail: str


def _records(path: Path) -> Iterator[TrafficRecord]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip() and (record := TrafficRecord.from_line(line)) is not None:
                yield record


def find_requests(traffic_dir: Path, ids: set[str]) -> dict[str, list[TrafficRecord]]:
    """Each id's records (one per text, in order) from its newest request in the log.
    Reading stops as soon as every id is found; an id not in the log is absent."""
    found: dict[str, list[TrafficRecord]] = {}
    if not ids:
        return found
    for path in traffic_files(traffic_dir):
        in_file: dict[str, list[TrafficRecord]] = {}
        previous = None
        for record in _records(path):
            rid = record.request_id
            if rid in ids and rid not in found:
                # A request's records are written together: a new run of the id is a new
                # request, and the last run in the file is the newest.
                if previous != rid:
                    in_file[rid] = []
                in_file[rid].append(record)
            previous = rid
        found.update(in_file)
        if len(found) == len(ids):
            break
    return found


def submit(
    traffic_dir: Path,
    items: list[tuple[str, list[str]]],
    labels: list[str],
    source: str,
    key: str | None = None,
) -> list[Verdict]:
    """Check each (request id, labels) against the log and the model's labels; append the
    accepted ones to the feedback file, each with the name of the `key` that wrote it.
    Raises OSError if the file cannot be written (the caller says so; nothing is
    half-written: one line per item, one write)."""
    requests = find_requests(traffic_dir, {rid for rid, _ in items})
    verdicts, accepted = [], []
    now = datetime.now(UTC)
    for rid, given in items:
        records = requests.get(rid)
        unknown = sorted(set(given) - set(labels))
        if records is None:
            verdicts.append(Verdict(rid, 404, f"no request {rid!r} in the traffic log"))
        elif len(given) != len(records):
            verdicts.append(
                Verdict(
                    rid, 422, f"request {rid!r} had {len(records)} text(s), got {len(given)} labels"
                )
            )
        elif unknown:
            verdicts.append(
                Verdict(rid, 422, f"unknown label(s) {unknown} (the model's: {labels})")
            )
        else:
            accepted.append(
                FeedbackRecord(
                    received_at=now, request_id=rid, labels=given, source=source, key=key
                )
            )
            verdicts.append(Verdict(rid, 200, f"{len(given)} label(s) stored"))
    if accepted:
        _append(traffic_dir / FEEDBACK_FILE, [record.line() for record in accepted])
    return verdicts


def _append(path: Path, lines: list[str]) -> None:
    payload = "".join(line + "\n" for line in lines).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _append_lock:
        if _ends_torn(path):  # a write cut short by a crash: start on a line of our own
            payload = b"\n" + payload
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, payload)
            if written != len(payload):
                raise OSError(f"{path}: only {written} of {len(payload)} bytes written")
            os.fsync(fd)
        finally:
            os.close(fd)


def _ends_torn(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class Selection:
    """Which feedback an export takes: written by one of `keys` (None in it: no key; `keys`
    None: any key), received at or after `since` and before `until`."""

    keys: frozenset[str | None] | None = None
    since: datetime | None = None
    until: datetime | None = None

    def admits(self, record: FeedbackRecord) -> bool:
        return (
            (self.keys is None or record.key in self.keys)
            and (self.since is None or record.received_at >= self.since)
            and (self.until is None or record.received_at < self.until)
        )


def parse_instant(value: str, option: str) -> datetime:
    """An ISO 8601 date or time from the command line; one without an offset is UTC."""
    from lmops.errors import LmopsError

    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise LmopsError(
            f"{option} {value!r} is not an ISO 8601 date or time "
            "(e.g. 2025-06-01 or 2025-06-01T08:30:00+08:00)"
        ) from None
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def latest_feedback(
    traffic_dir: Path, selection: Selection = Selection()
) -> dict[str, FeedbackRecord]:
    """Each request's newest feedback record among those `selection` admits."""
    path = traffic_dir / FEEDBACK_FILE
    if not path.is_file():
        return {}
    latest: dict[str, FeedbackRecord] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            record = FeedbackRecord.from_line(line) if line.strip() else None
            if record is not None and selection.admits(record):
                latest[record.request_id] = record
    return latest


def labels_by_request(traffic_dir: Path) -> dict[str, list[str]]:
    """Every request's true labels given so far (the newest feedback per id wins)."""
    return {rid: record.labels for rid, record in latest_feedback(traffic_dir).items()}


@dataclass(frozen=True)
class LabelledText:
    """A logged text with its true label, the label the model served, and who gave which."""

    text: str
    label: str
    served_label: str
    key: str | None
    received_at: datetime


def labelled_traffic(
    traffic_dir: Path, selection: Selection = Selection()
) -> Iterator[LabelledText]:
    """Every logged text with feedback that `selection` admits (texts kept as logged, with
    personal data redacted; hashed-only records have no text to give)."""
    given = latest_feedback(traffic_dir, selection)
    requests = find_requests(traffic_dir, set(given))
    for rid, records in requests.items():
        feedback = given[rid]
        for record, label in zip(records, feedback.labels, strict=False):
            if record.text is not None:
                yield LabelledText(
                    record.text, label, record.label, feedback.key, feedback.received_at
                )


def write_export(
    path: Path, traffic_dir: Path, selection: Selection, source: pd.DataFrame | None = None
) -> tuple[int, Counter[str | None]]:
    """`lmops feedback --export`: the labelled traffic `selection` admits, as a CSV that
    data.source reads, each row with its provenance (PROVENANCE_COLUMNS). `source`'s own
    rows come first with their provenance empty, less the texts labelled again (the new
    label wins). Returns the rows written and the labelled texts per key."""
    import csv

    from lmops.sources import PROVENANCE_COLUMNS

    labelled = list(labelled_traffic(traffic_dir, selection))
    rows = [
        (item.text, item.label, item.served_label, item.key or "", item.received_at.isoformat())
        for item in labelled
    ]
    if source is not None:
        if "served_label" in source.columns:
            # An earlier export's labelled traffic is taken afresh from the feedback log,
            # under this selection: kept as plain rows, it would escape both.
            source = source[source["served_label"].fillna("").astype(str).str.strip() == ""]
        relabelled = {item.text for item in labelled}
        blank = ("",) * len(PROVENANCE_COLUMNS)
        rows = [
            (text, label, *blank)
            for text, label in zip(source["text"], source["label"].astype(str), strict=True)
            if text not in relabelled
        ] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", *PROVENANCE_COLUMNS])
        writer.writerows(rows)
    return len(rows), Counter(item.key for item in labelled)


def read_items(path: Path) -> list[tuple[str, list[str]]]:
    """`lmops feedback FILE`: JSON Lines of {"request_id": ..., "labels": [...]}, or a CSV
    with `request_id` and `label` columns (one row per text, in the request's order)."""
    from lmops.errors import DataError

    if path.suffix == ".csv":
        import pandas as pd

        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = {"request_id", "label"} - set(frame.columns)
        if missing:
            raise DataError(f"{path}: no {sorted(missing)} column(s) (has {list(frame.columns)})")
        grouped = frame.groupby("request_id", sort=False)["label"]
        return [(str(rid), list(labels)) for rid, labels in grouped]
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = FeedbackItem.model_validate_json(line)
        except ValidationError:
            raise DataError(
                f'{path}:{number}: not {{"request_id": "...", "labels": ["...", ...]}}'
            ) from None
        items.append((item.request_id, item.labels))
    return items


class FeedbackItem(BaseModel):
    """One line of a feedback file, as POST /v1/feedback takes it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str
    labels: list[str] = Field(min_length=1)


def realized(
    request_ids: Iterable[str | None], predicted: Iterable[str], given: dict[str, list[str]]
) -> tuple[int, float | None]:
    """(labelled texts, accuracy on them) of a window's records, in log order: the k-th
    record of a request is the request's k-th text."""
    seen: dict[str, int] = {}
    right = total = 0
    for rid, label in zip(request_ids, predicted, strict=True):
        if rid is None or rid not in given:
            continue
        k = seen.get(rid, 0)
        seen[rid] = k + 1
        if k < len(given[rid]):
            total += 1
            right += given[rid][k] == label
    return total, (right / total if total else None)


def realized_by_version(
    request_ids: list[str | None],
    predicted: list[str],
    versions: list[str],
    given: dict[str, list[str]],
) -> dict[str, tuple[int, float | None]]:
    """`realized` per model version that answered (a canary beside prod): a request is
    answered by one version, so each version's rows keep its requests' text order."""
    by_version: dict[str, tuple[list[str | None], list[str]]] = {}
    for rid, label, version in zip(request_ids, predicted, versions, strict=True):
        ids, labels = by_version.setdefault(version, ([], []))
        ids.append(rid)
        labels.append(label)
    return {v: realized(ids, labels, given) for v, (ids, labels) in by_version.items()}
