"""Validate: the data contract, as Great Expectations suites over every split and the corpus,
and the feedback contract over the labelled traffic among the rows.

A failing batch stops the run: it is copied with GX's result and Data Docs to
`data/quarantine/<timestamp>/`, the error names each failed expectation with a few
offending rows, and the last good `data/validated/` is left exactly as it was.

The Data Docs keep every run: GX's results are stored beside the pages (`results/`), each
run starts from the last published site, and the index lists them all. The pages are made
to read offline (lmops/datadocs.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from lmops.artifacts import DataManifest, PersonalData, SourceSummary
from lmops.atomic import atomic_dir, write_json
from lmops.config import ValidationConfig
from lmops.datadocs import make_offline
from lmops.errors import DataError, ValidationFailed
from lmops.sources import FEEDBACK_COLUMNS, content_sha256

log = logging.getLogger(__name__)

TABLES = ("train", "val", "test", "corpus")
# The labelled traffic among the labelled rows (ingest's feedback.parquet): checked by the
# feedback contract when it has rows, and published beside the tables.
FEEDBACK = "feedback"
# U+FFFD marks bytes a decoder could not read; NUL and stray surrogates are never text.
UNREADABLE = r"[\ufffd\x00\ud800-\udfff]"
DOCS_SITE = "lmops"
RESULTS_DIR = "results"  # GX's stored validation results, inside the Data Docs folder


def _load(ingested_dir: Path) -> dict[str, pd.DataFrame]:
    names = (*TABLES, FEEDBACK)
    missing = [t for t in names if not (ingested_dir / f"{t}.parquet").is_file()]
    if missing:
        raise DataError(f"{ingested_dir}: no ingested {', '.join(missing)} (run ingest first)")
    return {t: pd.read_parquet(ingested_dir / f"{t}.parquet") for t in names}


def _text_expectations(gxe: Any, cfg: ValidationConfig, min_rows: int) -> list[Any]:
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValuesToBeOfType(column="text", type_="str"),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=cfg.min_text_chars, max_value=cfg.max_text_chars
        ),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=UNREADABLE),
        gxe.ExpectColumnValuesToBeUnique(column="text"),
    ]


def _class_share(gxe: Any, label: str, share: float, rows: int) -> Any:
    """The class `label` holds at least `share` of the rows, checked as a count of its rows.

    `ExpectColumnValuesToBeInSet([label], mostly=share)` checks the same, but Data Docs show
    its passing result as "48% unexpected" (the other classes' rows): it reads as a failure."""
    from great_expectations.expectations.row_conditions import Column

    # Rounded first: 0.2 * 1200 is 240.00000000000003 in floating point.
    minimum = math.ceil(round(share * rows, 9))
    return gxe.ExpectTableRowCountToBeBetween(
        min_value=minimum,
        row_condition=Column("label") == label,
        description=(
            f"At least {share * 100:g}% of the rows ({minimum:,} of {rows:,}) are labelled "
            f"{label!r}"
        ),
    )


def build_suites(
    gx: Any, cfg: ValidationConfig, labels: list[str], rows: dict[str, int]
) -> dict[str, Any]:
    """One suite per batch: the three labelled splits, the corpus, and all splits together.
    `rows` has each split's row count, which the class shares are counted against."""
    import great_expectations.expectations as gxe

    suites: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        suite = gx.ExpectationSuite(name=f"lmops_{split}")
        suite.add_expectation(
            gxe.ExpectTableColumnsToMatchSet(column_set=["text", "label"], exact_match=True)
        )
        for expectation in _text_expectations(gxe, cfg, getattr(cfg.min_rows, split)):
            suite.add_expectation(expectation)
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="label"))
        suite.add_expectation(
            gxe.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=labels)
        )
        for label in labels:
            suite.add_expectation(_class_share(gxe, label, cfg.min_class_share, rows[split]))
        suites[split] = suite
    corpus = gx.ExpectationSuite(name="lmops_corpus")
    corpus.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=["text"], exact_match=True))
    for expectation in _text_expectations(gxe, cfg, cfg.min_rows.corpus):
        corpus.add_expectation(expectation)
    suites["corpus"] = corpus
    # No cross-batch expectation works on pandas: concatenate, then a text must be unique.
    disjoint = gx.ExpectationSuite(name="lmops_splits_disjoint")
    disjoint.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="text"))
    suites["splits_disjoint"] = disjoint
    return suites


def feedback_suite(
    gx: Any, cfg: ValidationConfig, labels: list[str], feedback: pd.DataFrame, train: pd.DataFrame
) -> Any:
    """The feedback contract (validation.feedback) over the labelled traffic: its labels are
    the data's, each class's share is near its share of train, and each key's labels agree
    with what the model served often enough. An honest labeller agrees about as often as
    the model is right; a flood of flipped labels almost never does."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    contract, rows = cfg.feedback, len(feedback)
    suite = gx.ExpectationSuite(name="lmops_feedback")
    suite.add_expectation(
        gxe.ExpectTableColumnsToMatchSet(column_set=list(FEEDBACK_COLUMNS), exact_match=True)
    )
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels))
    shares = train["label"].value_counts(normalize=True)
    for label in labels:
        share = float(shares.get(label, 0.0))
        # Rounded first, as in _class_share; too few rows for any count to fit the band: the
        # nearest count above it.
        low = max(0, math.ceil(round((share - contract.max_class_shift) * rows, 9)))
        high = max(low, math.floor(round((share + contract.max_class_shift) * rows, 9)))
        suite.add_expectation(
            gxe.ExpectTableRowCountToBeBetween(
                min_value=low,
                max_value=high,
                row_condition=Column("label") == label,
                description=(
                    f"{low:,} to {high:,} of the {rows:,} feedback rows are labelled {label!r}: "
                    f"its share of train ({share:.1%}) ± validation.feedback.max_class_shift "
                    f"({contract.max_class_shift:g})"
                ),
            )
        )
    for key in sorted(feedback["feedback_key"].unique()):
        who = f"key {key!r}" if key else "no key (open feedback)"
        suite.add_expectation(
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="label",
                column_B="served_label",
                mostly=contract.min_agreement,
                row_condition=Column("feedback_key") == key,
                description=(
                    f"Labels written with {who} agree with the served label on at least "
                    f"{contract.min_agreement:.0%} of its rows (validation.feedback.min_agreement)"
                ),
            )
        )
    return suite


def _batches(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    together = pd.concat(
        [tables[s].assign(split=s) for s in ("train", "val", "test")], ignore_index=True
    )
    return {**tables, "splits_disjoint": together}


def _context(gx: Any, docs_dir: Path) -> Any:
    """An in-memory context whose validation results and Data Docs are files in `docs_dir`:
    the index lists every result stored there, from this run and the earlier ones."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    def files(path: Path) -> dict[str, str]:
        return {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(path)}

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": files(docs_dir),
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "show_how_to_buttons": False,  # GX's tutorial pop-up over every result page
            }
        },
        progress_bars=ProgressBarsConfig(globally=False),
    )
    config.stores[config.validation_results_store_name]["store_backend"] = files(
        docs_dir / RESULTS_DIR
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _offending_rows(result: Any, frame: pd.DataFrame) -> str:
    indexes = result.result.get("partial_unexpected_index_list") or []
    if indexes:
        shown = []
        for index in indexes:
            row = frame.loc[index] if index in frame.index else None
            text = "" if row is None else str(row.get("text", ""))
            where = f" [{row['split']}]" if row is not None and "split" in row else ""
            shown.append(f"row {index + 1}{where}: {text[:60]!r}")
        return "; ".join(shown)
    values = result.result.get("partial_unexpected_list") or []
    if values:
        return "values " + ", ".join(repr(str(v)[:60]) for v in values)
    observed = result.result.get("observed_value")
    return f"observed {observed!r}" if observed is not None else ""


def _agreement(result: Any) -> str:
    """How often a key's labels equalled the served ones (GX counts the rows the key's
    condition selects)."""
    counted = result.result["element_count"]  # at least one: a key is there for its rows
    agreed = counted - result.result["unexpected_count"]
    return f"agreed on {agreed:,} of {counted:,} rows ({agreed / counted:.1%})"


def _describe_failure(batch: str, result: Any, frame: pd.DataFrame) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in {"batch_id"}}
    if len(str(kwargs)) > 120:
        kwargs = {k: v for k, v in kwargs.items() if k in {"column", "mostly"}}
    what = repr(config.description) if config.description else kwargs
    raised = result.exception_info.get("raised_exception")
    if raised:
        detail = f"could not be evaluated: {result.exception_info.get('exception_message')}"
    elif config.type == "expect_column_pair_values_to_be_equal":
        detail = f"{_agreement(result)}; {_offending_rows(result, frame)}"
    else:
        detail = _offending_rows(result, frame)
    return f"{batch}: {config.type} {what} failed — {detail}"


def label_contract(
    cfg: ValidationConfig, source: str, found: list[str], previous: SourceSummary | None
) -> tuple[list[str], str | None]:
    """The labels this version must have, and why a change of labels is refused (or None).

    `previous` is the labelled source of the last validated version, if any."""
    from lmops.sources import builtin_labels

    if cfg.labels is None:
        return found, None
    if cfg.labels != "auto":
        return list(cfg.labels), None
    known = builtin_labels(source)
    if known is not None:
        return known, None
    if previous is None or previous.spec != source:
        return found, None  # the first validated version of this source pins its labels
    pinned = list(previous.labels or [])
    if sorted(pinned) == sorted(found):
        return pinned, None
    return pinned, (
        f"labels changed between versions of data.source={source}: the last validated "
        f"version has {pinned}, this one has {found}. validation.labels decides: 'auto' keeps "
        f"the first version's labels; set validation.labels to {found} to accept the new set"
    )


@contextlib.contextmanager
def _gx_logs_quiet() -> Iterator[None]:
    """GX logs its internals at INFO, and a Data Docs renderer bug (KeyError
    'unexpected_percent' on aggregate expectations) at ERROR with a traceback, above
    lmops's own error. Neither is the user's to act on: the failure lines say what failed."""
    # Its modules set their own levels, so the whole tree is cut off at its root instead.
    gx_log, sink = logging.getLogger("great_expectations"), logging.NullHandler()
    propagate = gx_log.propagate
    gx_log.propagate = False
    gx_log.addHandler(sink)
    try:
        yield
    finally:
        gx_log.removeHandler(sink)
        gx_log.propagate = propagate


@_gx_logs_quiet()
def validate_tables(
    tables: dict[str, pd.DataFrame],
    cfg: ValidationConfig,
    docs_dir: Path,
    show_rows: int,
    labels: list[str],
    run_name: str,
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Run every suite (the feedback contract when the feedback table has rows); return the
    failure lines, per-batch stats and GX's raw results.

    Every batch is validated under one run (`run_name`, now), so the Data Docs index shows
    the batches of one run together; the pages are then made to read offline."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(gx, docs_dir)
    source = context.data_sources.add_pandas("lmops")
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
    failures: list[str] = []
    stats: dict[str, Any] = {}
    raw_results: dict[str, Any] = {}
    batches = _batches(tables)
    rows = {split: len(frame) for split, frame in batches.items()}
    suites = build_suites(gx, cfg, labels, rows)
    if rows[FEEDBACK]:
        suites[FEEDBACK] = feedback_suite(gx, cfg, labels, tables[FEEDBACK], tables["train"])
    for batch, suite in suites.items():
        frame = batches[batch]
        definition = source.add_dataframe_asset(batch).add_batch_definition_whole_dataframe(batch)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=batch, data=definition, suite=context.suites.add(suite))
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"lmops_{batch}",
                validation_definitions=[validation],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[DOCS_SITE])],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": show_rows},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
        raw_results[batch] = outcome.describe_dict()
        results = [r for run in outcome.run_results.values() for r in run.results]
        failed = [r for r in results if not r.success or r.exception_info.get("raised_exception")]
        failures.extend(_describe_failure(batch, r, frame) for r in failed)
        stats[batch] = {"rows": len(frame), "expectations": len(results), "failed": len(failed)}
    make_offline(docs_dir)
    return failures, stats, raw_results


def run_name(manifest: DataManifest) -> str:
    """The name the Data Docs give a run (and a folder of their pages): a digest of the
    tables' contents, so two runs on the same data say so."""
    contents = "".join(f"{t}:{h};" for t, h in sorted(manifest.content_sha256.items()))
    return f"data-{hashlib.sha256(contents.encode()).hexdigest()[:12]}"


def _personal_data(tables: dict[str, pd.DataFrame]) -> dict[str, dict[int, dict[str, int]]]:
    """Per table, the rows (by position) holding personal data, with each kind's count."""
    from lmops import pii

    found: dict[str, dict[int, dict[str, int]]] = {}
    for name, table in tables.items():
        rows = {}
        for row, text in enumerate(table["text"]):
            kinds = Counter(kind for kind, _, _ in pii.find(text))
            if kinds:
                rows[row] = dict(kinds)
        if rows:
            found[name] = rows
    return found


def _kind_totals(rows: dict[int, dict[str, int]]) -> dict[str, int]:
    return dict(sum((Counter(kinds) for kinds in rows.values()), Counter()))


def _personal_data_failure(found: dict[str, dict[int, dict[str, int]]], shown: int) -> str:
    """The failure line: kinds, counts and row numbers, never the personal data itself."""
    parts = [
        f"{name}: "
        + ", ".join(f"{n} {kind}" for kind, n in sorted(_kind_totals(rows).items()))
        + f" in rows {', '.join(map(str, list(rows)[:shown]))}"
        + (", …" if len(rows) > shown else "")
        for name, rows in found.items()
    ]
    return "personal data (validation.pii: fail; redact replaces it): " + "; ".join(parts)


def _redact(
    tables: dict[str, pd.DataFrame], personal: dict[str, dict[int, dict[str, int]]]
) -> dict[str, pd.DataFrame]:
    """The tables that held personal data, each match replaced by its placeholder."""
    from lmops import pii

    redacted = {}
    for name, rows in personal.items():
        table = tables[name].copy()
        column = table.columns.get_loc("text")
        for row in rows:
            table.iat[row, column] = pii.redact(table.iat[row, column])[0]
        redacted[name] = table
    return redacted


def _quarantine(ingested_dir: Path, quarantine_root: Path, docs: Path, raw: dict) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = quarantine_root / stamp
    shutil.copytree(ingested_dir, target / "batch")
    shutil.move(str(docs), target / "data_docs")
    write_json(target / "gx_result.json", raw)
    return target


def run(
    cfg: ValidationConfig,
    ingested_dir: Path,
    validated_dir: Path,
    docs_dir: Path,
    quarantine_root: Path,
    metrics_path: Path,
) -> dict[str, Any]:
    """Validate `ingested_dir`; on success publish it as `validated_dir` with Data Docs."""
    tables = _load(ingested_dir)
    ingested = DataManifest.of(ingested_dir)
    previous = (
        DataManifest.of(validated_dir) if (validated_dir / DataManifest.FILE).is_file() else None
    )
    labels, changed = label_contract(
        cfg,
        ingested.labelled.spec,
        sorted(tables["train"]["label"].unique()),
        previous.labelled if previous else None,
    )
    docs_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch_docs = Path(tempfile.mkdtemp(prefix=".docs-", dir=docs_dir.parent))
    try:
        if docs_dir.is_dir():  # the earlier runs' results and pages, for the index
            shutil.copytree(docs_dir, scratch_docs, dirs_exist_ok=True)
        failures, stats, raw = validate_tables(
            tables, cfg, scratch_docs, cfg.show_failed_rows, labels, run_name(ingested)
        )
        if changed:
            failures.insert(0, changed)
        personal = _personal_data(tables)
        if personal and cfg.pii == "fail":
            failures.append(_personal_data_failure(personal, cfg.show_failed_rows))
        if failures:
            where = _quarantine(ingested_dir, quarantine_root, scratch_docs, raw)
            raise ValidationFailed(
                f"{len(failures)} expectation(s) failed; batch quarantined in {where} "
                f"(last good {validated_dir} untouched):\n  " + "\n  ".join(failures)
            )
        redacted = _redact(tables, personal) if cfg.pii == "redact" else {}
        manifest = ingested.model_copy(
            update={
                "personal_data": PersonalData(
                    policy=cfg.pii,
                    found={name: _kind_totals(rows) for name, rows in personal.items()},
                    redacted=bool(redacted),
                ),
                "content_sha256": {
                    **ingested.content_sha256,
                    **{name: content_sha256(table) for name, table in redacted.items()},
                },
            }
        )
        if personal and cfg.pii == "warn":
            log.warning(
                "validate: personal data kept (validation.pii: warn): %s",
                manifest.personal_data.found,
            )
        with atomic_dir(validated_dir) as scratch:
            for name in tables:
                if name in redacted:
                    redacted[name].to_parquet(scratch / f"{name}.parquet", index=False)
                else:
                    shutil.copy2(ingested_dir / f"{name}.parquet", scratch / f"{name}.parquet")
            manifest.write(scratch / DataManifest.FILE)
        with atomic_dir(docs_dir) as published:
            shutil.copytree(scratch_docs, published, dirs_exist_ok=True)
    finally:
        shutil.rmtree(scratch_docs, ignore_errors=True)
    summary = {"success": True, "batches": stats}
    write_json(metrics_path, summary)
    log.info(
        "validate: %s passed; wrote %s and Data Docs %s",
        ", ".join(f"{b} ({s['expectations']})" for b, s in stats.items()),
        validated_dir,
        docs_dir / "index.html",
    )
    return summary
