"""The feedback contract, through the real stages: labelled traffic exported by `lmops
feedback --export` (with its provenance) is ingested and held to validation.feedback, so
that a flood of flipped labels from one key is quarantined before anything trains on it,
while an honest labeller's labels pass."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner, Result

from lmops import feedback
from lmops.artifacts import DataManifest, traffic_file_name
from lmops.cli import app
from lmops.config import override, parse_params, read_raw
from lmops.errors import ValidationFailed
from lmops.sources import FEEDBACK_COLUMNS, PROVENANCE_COLUMNS
from lmops.stages import INGESTED_DIR, QUARANTINE_DIR, VALIDATED_DIR
from lmops.tasks import validate
from lmops.tasks.stages import STAGES
from tests.conftest import tiny_raw, traffic_record, tree_digest

LABELS = ["negative", "positive"]
EXPORT = "labelled.csv"


def _flip(label: str) -> str:
    return LABELS[1 - LABELS.index(label)]


def _project(root: Path, repo_params_raw: dict, **dotted: str) -> Path:
    """A project with the tiny profile's params (its data.source: builtin:zh-reviews)."""
    raw = override(tiny_raw(repo_params_raw), dotted)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), "utf-8")
    return root


def _serve(root: Path, prefix: str, texts: list[str], served: list[str]) -> list[str]:
    """What the server logs: one request per text, answered `served`; the request ids."""
    traffic_dir = root / "data" / "traffic"
    traffic_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ids = [f"{prefix}-{n}" for n in range(len(texts))]
    with (traffic_dir / traffic_file_name(now)).open("a", encoding="utf-8") as handle:
        for rid, text, label in zip(ids, texts, served, strict=True):
            handle.write(traffic_record(text, now, request_id=rid, label=label) + "\n")
    return ids


def _label(root: Path, ids: list[str], labels: list[str], key: str | None) -> None:
    items = [(rid, [label]) for rid, label in zip(ids, labels, strict=True)]
    verdicts = feedback.submit(root / "data" / "traffic", items, LABELS, "api", key=key)
    assert all(v.status == 200 for v in verdicts)


def _lmops(root: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    monkeypatch.chdir(root)
    return CliRunner().invoke(app, list(args))


def _ingest_and_validate(root: Path) -> dict:
    """`lmops stage ingest` then `lmops stage validate` with data.source set to the export
    (`lmops run --set data.source=labelled.csv`)."""
    params = parse_params(override(read_raw(root), {"data.source": EXPORT}))
    STAGES["ingest"](params, root)
    return STAGES["validate"](params, root)


@pytest.fixture(scope="module")
def reviews(tiny_validated: Path) -> pd.DataFrame:
    """Real labelled reviews (the tiny profile's), the same number of each class in order."""
    frames = [pd.read_parquet(tiny_validated / f"{s}.parquet") for s in ("train", "val", "test")]
    together = pd.concat(frames, ignore_index=True)
    by_class = [together[together["label"] == label].reset_index(drop=True) for label in LABELS]
    size = min(len(frame) for frame in by_class)
    return pd.concat(
        [pd.concat([by_class[0].iloc[[n]], by_class[1].iloc[[n]]]) for n in range(size)],
        ignore_index=True,
    )


def test_a_flood_of_flipped_labels_is_quarantined_and_honest_labels_pass(
    repo_params_raw: dict,
    reviews: pd.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _project(tmp_path, repo_params_raw)
    honest, flood = reviews.iloc[:50], reviews.iloc[50:550]
    truth = honest["label"].tolist()
    # The model answered 45 of alice's 50 texts right; she corrects the other 5.
    served = [_flip(label) if n % 10 == 0 else label for n, label in enumerate(truth)]
    _label(root, _serve(root, "alice", honest["text"].tolist(), served), truth, key="alice")

    exported = _lmops(root, monkeypatch, "feedback", "--export", EXPORT, "--with-source")
    assert exported.exit_code == 0, exported.output
    assert "50 labelled from the traffic (alice 50)" in exported.output
    summary = _ingest_and_validate(root)
    assert summary["batches"]["feedback"] == {"rows": 50, "expectations": 5, "failed": 0}
    published = pd.read_parquet(root / VALIDATED_DIR / "feedback.parquet")
    assert list(published.columns) == list(FEEDBACK_COLUMNS) and len(published) == 50
    assert set(published["feedback_key"]) == {"alice"}
    assert (published["label"] == published["served_label"]).sum() == 45
    assert DataManifest.of(root / VALIDATED_DIR).rows["feedback"] == 50
    good = tree_digest(root / VALIDATED_DIR)

    # mallory flips every label the model gave on 500 texts (all of them right).
    flood_truth = flood["label"].tolist()
    flood_ids = _serve(root, "mallory", flood["text"].tolist(), flood_truth)
    _label(root, flood_ids, [_flip(label) for label in flood_truth], key="mallory")
    exported = _lmops(root, monkeypatch, "feedback", "--export", EXPORT, "--with-source")
    assert exported.exit_code == 0, exported.output
    with pytest.raises(ValidationFailed) as refused:
        _ingest_and_validate(root)
    message = str(refused.value)
    assert "key 'mallory' agree with the served label on at least 50%" in message
    assert "agreed on 0 of 500 rows (0.0%)" in message
    assert "'alice'" not in message  # her labels still agree
    assert tree_digest(root / VALIDATED_DIR) == good
    (quarantined,) = (root / QUARANTINE_DIR).iterdir()
    assert tree_digest(quarantined / "batch") == tree_digest(root / INGESTED_DIR)
    assert len(pd.read_parquet(quarantined / "batch" / "feedback.parquet")) == 550
    assert (quarantined / "data_docs" / "index.html").is_file()

    # Leaving the key out of the export is how the next training run goes on without it.
    exported = _lmops(
        root, monkeypatch, "feedback", "--export", EXPORT, "--with-source", "--key", "alice"
    )
    assert exported.exit_code == 0, exported.output
    assert _ingest_and_validate(root)["batches"]["feedback"]["failed"] == 0


def test_export_filters_by_key_and_time_and_keeps_the_provenance(
    repo_params_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _project(tmp_path, repo_params_raw)
    ids = _serve(root, "r", ["好评一", "差评二", "好评三"], ["positive", "positive", "positive"])
    _label(root, ids[:1], ["positive"], key="alice")
    _label(root, ids[1:2], ["negative"], key=None)  # open feedback
    time.sleep(0.01)
    between = datetime.now(UTC)
    time.sleep(0.01)
    _label(root, ids[2:], ["negative"], key="bob")

    def export(*filters: str) -> pd.DataFrame:
        result = _lmops(root, monkeypatch, "feedback", "--export", "out.csv", *filters)
        assert result.exit_code == 0, result.output
        return pd.read_csv(root / "out.csv", dtype=str, keep_default_na=False)

    everything = export()
    assert list(everything.columns) == ["text", "label", *PROVENANCE_COLUMNS]
    assert everything.set_index("text")[["label", "served_label", "feedback_key"]].to_dict(
        "index"
    ) == {
        "好评一": {"label": "positive", "served_label": "positive", "feedback_key": "alice"},
        "差评二": {"label": "negative", "served_label": "positive", "feedback_key": ""},
        "好评三": {"label": "negative", "served_label": "positive", "feedback_key": "bob"},
    }
    assert all(datetime.fromisoformat(at).tzinfo for at in everything["feedback_at"])
    assert export("--key", "alice")["text"].tolist() == ["好评一"]
    assert sorted(export("--key", "alice", "--key", "-")["text"]) == ["好评一", "差评二"]
    assert export("--since", between.isoformat())["text"].tolist() == ["好评三"]
    naive = between.replace(tzinfo=None).isoformat()  # no offset: UTC
    assert sorted(export("--until", naive)["text"]) == ["好评一", "差评二"]
    assert export("--key", "bob", "--until", naive).empty

    # data.source pointed at an earlier export: its labelled traffic is taken afresh from
    # the feedback log under the filters, never laundered into plain source rows.
    earlier = everything.assign(text=everything["text"] + "!")  # texts no longer relabelled
    earlier = pd.concat([earlier, pd.DataFrame({"text": ["原来的"], "label": ["positive"]})])
    earlier.to_csv(root / "earlier.csv", index=False)
    _project(tmp_path, repo_params_raw, **{"data.source": "earlier.csv"})
    again = export("--with-source", "--key", "alice")
    assert again.set_index("text")["feedback_key"].to_dict() == {"原来的": "", "好评一": "alice"}

    (root / "out.csv").unlink()
    bad = _lmops(root, monkeypatch, "feedback", "--export", "out.csv", "--since", "yesterday")
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        "error: --since 'yesterday' is not an ISO 8601 date or time "
        "(e.g. 2025-06-01 or 2025-06-01T08:30:00+08:00)"
    ]
    assert not (root / "out.csv").exists()
    alone = _lmops(root, monkeypatch, "feedback", "labels.jsonl", "--key", "alice")
    assert alone.exit_code == 1 and "give --export" in alone.output


def test_a_source_without_served_labels_validates_as_before(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    """No labelled traffic: an empty feedback table, no feedback batch, the same batches."""
    ingested = pd.read_parquet(tiny_validated / "feedback.parquet")
    assert list(ingested.columns) == list(FEEDBACK_COLUMNS) and ingested.empty
    cfg = parse_params(tiny_raw(repo_params_raw)).validation
    out = {name: tmp_path / name for name in ("validated", "docs", "quarantine", "v.json")}
    summary = validate.run(cfg, tiny_validated, *out.values())
    assert set(summary["batches"]) == {"train", "val", "test", "corpus", "splits_disjoint"}
    assert all(batch["failed"] == 0 for batch in summary["batches"].values())
    assert pd.read_parquet(tmp_path / "validated" / "feedback.parquet").empty
    assert DataManifest.of(tmp_path / "validated").rows["feedback"] == 0
