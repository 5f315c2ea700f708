"""Typed configuration loaded from params.yaml, with profiles and --set overrides.

params.yaml is the single source of every knob (DVC's convention). The models below
carry no defaults on purpose: a knob missing from params.yaml is an error, so the file
always tells the whole truth about a run. Runs rewrite params.yaml, so the defaults live
apart, in `profiles/default.yaml` (params.yaml as the repository ships it; a test keeps the
two equal), and a profile `profiles/NAME.yaml` holds only the knobs it changes from them.
With `--profile NAME` every knob is written into params.yaml before the run (its default,
the profile's value, or a `--set key=value`), the way `dvc exp run --set-param` does, so
`dvc.lock` records what was really used and no value of an earlier profile survives.
Without a profile only the --set keys are written, over params.yaml as it stands.
"""

from __future__ import annotations

import copy
import io
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmops.errors import ConfigError

PARAMS_FILE = "params.yaml"
PROFILES_DIR = "profiles"
# The profile that holds every param at its default value.
DEFAULT_PROFILE = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SplitConfig(_Strict):
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    seed: int


class DataConfig(_Strict):
    source: str = Field(min_length=1)
    corpus: str = Field(min_length=1)
    normalization: Literal["NFKC", "NFC", "none"]
    max_text_chars: int = Field(gt=0)
    max_rows: int | None = Field(gt=0)
    corpus_max_docs: int | None = Field(gt=0)
    split: SplitConfig
    label_issues: Literal["report", "drop_train"]

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> DataConfig:
        if self.split.val_fraction + self.split.test_fraction >= 0.9:
            raise ValueError("split.val_fraction + split.test_fraction must stay below 0.9")
        return self


class MinRowsConfig(_Strict):
    train: int = Field(ge=1)
    val: int = Field(ge=1)
    test: int = Field(ge=1)
    corpus: int = Field(ge=1)


class FeedbackContractConfig(_Strict):
    min_agreement: float = Field(ge=0, le=1)
    max_class_shift: float = Field(gt=0, le=1)


class ValidationConfig(_Strict):
    min_rows: MinRowsConfig
    min_text_chars: int = Field(ge=1)
    max_text_chars: int = Field(gt=0)
    labels: list[str] | Literal["auto"] | None
    min_class_share: float = Field(gt=0, lt=1)
    show_failed_rows: int = Field(ge=1)
    pii: Literal["fail", "redact", "warn"]
    feedback: FeedbackContractConfig


class TokenizerConfig(_Strict):
    kind: Literal["wordpiece", "bpe"]
    vocab_size: int = Field(ge=100)
    min_frequency: int = Field(ge=1)
    lowercase: bool
    limit_alphabet: int = Field(ge=100)
    sample_docs: int | None = Field(ge=1)


class ModelConfig(_Strict):
    architecture: Literal["bert", "gpt2"]
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=8)
    heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=8)
    max_length: int = Field(ge=8)
    dropout: float = Field(ge=0, lt=1)
    # Hashed n-gram embeddings added to the token embeddings: n-grams of orders
    # 2..input_ngram_order (0: none), hashed into input_ngram_buckets rows.
    input_ngram_order: int = Field(ge=0, le=4)
    input_ngram_buckets: int = Field(ge=1024)
    input_ngram_dim: int = Field(ge=1)
    # builtin:NAME (lmops/bases.py), a local Hugging Face checkpoint (config, weights,
    # tokenizer) to start from, or null.
    init_from: str | None = Field(min_length=1)
    init_pretraining: Literal["continue", "skip"]

    @model_validator(mode="after")
    def _ngram_order_is_an_ngram(self) -> ModelConfig:
        if self.input_ngram_order == 1:
            raise ValueError("model.input_ngram_order must be 0 (off) or at least 2")
        if self.input_ngram_order and self.architecture != "bert":
            # An n-gram starting at a position reads the tokens after it: a causal LM would
            # see the future.
            raise ValueError("model.input_ngram_order needs model.architecture=bert")
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"model.heads ({self.heads}) must divide model.hidden_size ({self.hidden_size})"
            )
        return self


class OptimConfig(_Strict):
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    schedule: Literal["linear", "cosine", "constant"]
    warmup_fraction: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    precision: Literal["fp32", "bf16", "auto"]
    seed: int


class PretrainConfig(OptimConfig):
    steps: int = Field(ge=1)
    texts: list[Literal["corpus", "train"]] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)
    mask_probability: float = Field(gt=0, lt=1)
    checkpoint_every: int = Field(ge=1)
    eval_batches: int = Field(ge=1)


class NgramChannelConfig(_Strict):
    enabled: bool
    order: int = Field(ge=1, le=4)
    buckets: int = Field(ge=1024)
    min_df: int = Field(ge=1)
    C: list[float] = Field(min_length=1)
    transformer_weights: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _weights_are_shares(self) -> NgramChannelConfig:
        if any(not 0 < w <= 1 for w in self.transformer_weights):
            raise ValueError("finetune.ngram_channel.transformer_weights must lie in (0, 1]")
        if any(c <= 0 for c in self.C):
            raise ValueError("finetune.ngram_channel.C must be positive")
        return self


class FinetuneConfig(OptimConfig):
    epochs: int = Field(ge=1)
    patience: int = Field(ge=0)
    label_smoothing: float = Field(ge=0, lt=1)
    from_pretrained: bool
    ngram_channel: NgramChannelConfig


class DistillConfig(OptimConfig):
    enabled: bool
    layers: int = Field(ge=1)
    epochs: int = Field(ge=1)
    temperature: float = Field(gt=0)
    soft_weight: float = Field(ge=0, le=1)
    max_accuracy_gap: float = Field(ge=0, le=1)


class PairedRuleConfig(_Strict):
    """How a paired comparison decides (lmops/stats.py): superiority needs the confidence
    interval of the difference above 0; non_inferiority above -margin."""

    rule: Literal["superiority", "non_inferiority"]
    margin: float = Field(ge=0, le=1)


class BehaviouralGatesConfig(_Strict):
    """Minimum pass rate of each behavioural check (tasks/evaluate.py), sentiment labels."""

    invariance_punctuation: float = Field(ge=0, le=1)
    directional_negative_suffix: float = Field(ge=0, le=1)
    minimum_functionality: float = Field(ge=0, le=1)


class GatesConfig(_Strict):
    min_accuracy: float = Field(ge=0, le=1)
    min_margin_over_baseline: float = Field(ge=-1, le=1)
    baseline_test: PairedRuleConfig
    confidence: float = Field(gt=0.5, lt=1)
    bootstrap_samples: int = Field(ge=100)
    relax_baseline: bool
    behavioural: BehaviouralGatesConfig


class BaselineConfig(_Strict):
    ngram_max: int = Field(ge=1)
    min_df: int = Field(ge=1)
    C: float = Field(gt=0)


class ErrorAnalysisConfig(_Strict):
    mistakes: int = Field(ge=0)
    deletion_texts: int = Field(ge=0)


class EvaluateConfig(_Strict):
    baseline: BaselineConfig
    length_buckets: list[int] = Field(min_length=1)
    calibration_bins: int = Field(ge=2)
    ablation: bool
    gates: GatesConfig
    errors: ErrorAnalysisConfig


class ParityConfig(_Strict):
    max_abs_logit_diff: float = Field(gt=0)
    min_label_agreement: float = Field(ge=0, le=1)
    max_int8_accuracy_drop: float = Field(ge=0, le=1)
    min_fp16_agreement: float = Field(ge=0, le=1)


class ExportConfig(_Strict):
    opset: int = Field(ge=14)
    variants: list[Literal["int8", "fp16"]]
    cpu_variant: Literal["fp32", "int8"]
    parity_batch_size: int = Field(ge=1)
    parity: ParityConfig


class TrafficConfig(_Strict):
    dir: str = Field(min_length=1)
    store_text: bool
    redact_pii: bool
    rotate_mb: float = Field(gt=0)


class ExplainConfig(_Strict):
    max_tokens: int = Field(ge=1)


class ShadowConfig(_Strict):
    share: float = Field(ge=0, le=1)
    max_pending: int = Field(ge=1)


class CanaryConfig(_Strict):
    share: float = Field(ge=0, lt=1)
    min_requests: int = Field(ge=1)
    window: int = Field(ge=1)
    max_error_rate_increase: float = Field(ge=0, le=1)
    max_latency_ratio: float = Field(gt=0)


ENDPOINT_GROUPS = ("inference", "feedback", "pages", "metrics")


class RateLimitsConfig(_Strict):
    feedback: int = Field(ge=0)
    explain: int = Field(ge=0)


class AuthConfig(_Strict):
    restricted: list[Literal["inference", "feedback", "pages", "metrics"]]
    keys_file: str | None = Field(min_length=1)
    allow_open_feedback: bool
    rate_limits: RateLimitsConfig


class TlsConfig(_Strict):
    certfile: str | None = Field(min_length=1)
    keyfile: str | None = Field(min_length=1)

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("serve.tls needs both certfile and keyfile, or neither")
        return self


class ServeConfig(_Strict):
    host: str = Field(min_length=1)
    port: int = Field(ge=0, le=65535)
    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    model_dir: str = Field(min_length=1)
    require_gpu: bool
    threads: int = Field(ge=0)
    max_batch_size: int = Field(ge=1)
    max_wait_ms: float = Field(ge=0)
    max_queue: int = Field(ge=1)
    max_texts_per_request: int = Field(ge=1)
    max_chars_per_text: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1024)
    max_request_id_chars: int = Field(ge=8)
    poll_seconds: float = Field(gt=0)
    drain_seconds: float = Field(ge=0)
    auth: AuthConfig
    tls: TlsConfig
    traffic: TrafficConfig
    explain: ExplainConfig
    shadow: ShadowConfig
    canary: CanaryConfig

    @property
    def pages_url(self) -> str:
        """Where `lmops serve` shows its pages (the registry's model pages, the reports):
        the links Prefect artifacts give, since a browser blocks file:// from an http page."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        scheme = "https" if self.tls.certfile else "http"
        return f"{scheme}://{host}:{self.port}"


class LiveEvidenceConfig(_Strict):
    required: bool
    min_texts: int = Field(ge=1)
    min_agreement: float = Field(ge=0, le=1)
    estimated_accuracy_margin: float = Field(ge=0, le=1)


class PromotionConfig(_Strict):
    max_accuracy_drop: float = Field(ge=0, le=1)
    max_macro_f1_drop: float = Field(ge=0, le=1)
    accuracy_vs_prod: PairedRuleConfig
    macro_f1_vs_prod: PairedRuleConfig
    confidence: float = Field(gt=0.5, lt=1)
    bootstrap_samples: int = Field(ge=100)
    max_latency_increase: float = Field(ge=0)
    latency_samples: int = Field(ge=10)
    max_cost_increase: float = Field(ge=0)
    live: LiveEvidenceConfig


class RegistryConfig(_Strict):
    remote: str = Field(min_length=1)


class CostConfig(_Strict):
    energy: Literal["codecarbon", "none"]
    country_iso_code: str | None = Field(pattern=r"^[A-Z]{3}$")


class OrchestrationConfig(_Strict):
    lock_timeout_minutes: float = Field(ge=0)
    stage_timeout_minutes: float = Field(gt=0)
    task_timeout_minutes: float = Field(gt=0)
    retries: int = Field(ge=0)
    retry_delay_seconds: float = Field(ge=0)


NumDriftMethod = Literal["wasserstein", "ks", "psi", "jensenshannon", "hellinger", "kl_div"]
CatDriftMethod = Literal["jensenshannon", "chisquare", "psi", "hellinger", "kl_div", "TVD"]


class MonitorWindowConfig(_Strict):
    hours: float | None = Field(gt=0)
    max_rows: int | None = Field(ge=1)


class ColumnDriftConfig(_Strict):
    num_method: NumDriftMethod
    num_threshold: float = Field(gt=0)
    cat_method: CatDriftMethod
    cat_threshold: float = Field(gt=0)
    drift_share: float = Field(gt=0, le=1)


class EmbeddingDriftConfig(_Strict):
    method: Literal["model", "mmd"]
    threshold: float = Field(gt=0)


class PerformanceEstimateConfig(_Strict):
    max_drop: float = Field(gt=0, lt=1)
    confidence: float = Field(gt=0.5, lt=1)


class MonitorConfig(_Strict):
    reference_splits: list[Literal["val", "test"]] = Field(min_length=1)
    window: MonitorWindowConfig
    min_rows: int = Field(ge=10)
    sample_rows: int = Field(ge=50)
    seed: int
    columns: ColumnDriftConfig
    embedding: EmbeddingDriftConfig
    performance: PerformanceEstimateConfig
    cooldown_hours: float = Field(ge=0)
    reports_dir: str = Field(min_length=1)
    workspace_dir: str = Field(min_length=1)

    @model_validator(mode="after")
    def _min_rows_fit_the_sample(self) -> MonitorConfig:
        if self.min_rows > self.sample_rows:
            raise ValueError(
                f"monitor.min_rows ({self.min_rows}) must not exceed monitor.sample_rows "
                f"({self.sample_rows})"
            )
        return self


class Params(_Strict):
    data: DataConfig
    validation: ValidationConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    distill: DistillConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    serve: ServeConfig
    monitor: MonitorConfig
    promotion: PromotionConfig
    registry: RegistryConfig
    cost: CostConfig
    orchestration: OrchestrationConfig

    @model_validator(mode="after")
    def _init_from_is_fine_tuned(self) -> Params:
        # Without this, fine-tuning would start from random weights shaped by the
        # checkpoint's tokenizer and the checkpoint would be ignored, silently.
        if self.model.init_from is not None and not self.finetune.from_pretrained:
            raise ValueError(
                f"model.init_from ({self.model.init_from}) needs finetune.from_pretrained=true: "
                "with false, fine-tuning starts from random weights and ignores the checkpoint"
            )
        return self


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _describe(error: dict[str, Any]) -> str:
    key = _dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: missing key"
    if not error["loc"]:
        # A rule across sections: its input is the whole params mapping.
        return error["msg"].removeprefix("Value error, ")
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: Any) -> Params:
    """Validate a params mapping; every problem is reported with its dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE} must hold a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise ConfigError(f"invalid params: {problems}") from None


def read_raw(root: Path) -> dict[str, Any]:
    path = root / PARAMS_FILE
    if not path.is_file():
        raise ConfigError(f"no {PARAMS_FILE} in {root} (run lmops from the project root)")
    try:
        return load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None


def load_params(root: Path = Path(".")) -> Params:
    return parse_params(read_raw(root))


def _set_dotted(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    node: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{origin}: unknown key {'.'.join(parts[: depth + 1])}")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def override(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of raw params with dotted-key overrides applied; an unknown key is an error."""
    tree = copy.deepcopy(raw)
    for key, value in overrides.items():
        _set_dotted(tree, key, value, origin=key)
    return tree


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `5e-5` and `1e4` are strings; people write floats so
    (and YAML 1.2 reads them as such), in params, profiles and --set alike."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds no arbitrary objects


def parse_set(expr: str) -> tuple[str, Any]:
    """`data.split.seed=3` -> ("data.split.seed", 3); the value is read as YAML."""
    key, sep, text = expr.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {expr!r}: expected key=value")
    try:
        value = load_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _read_profile(root: Path, name: str) -> dict[str, Any]:
    path = root / PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / PROFILES_DIR).glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r} (known: {', '.join(known) or 'none'})")
    try:
        tree = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"profile {name!r} must hold a mapping of params")
    return tree


def profile_overrides(root: Path, name: str) -> dict[str, Any]:
    """Every param as profile `name` sets it, as dotted keys: the defaults with the
    profile's changes on top.

    Every param, not only the profile's: written into params.yaml, they leave no value of
    an earlier profile behind.
    """
    changes = _flatten(_read_profile(root, name))
    defaults = _read_profile(root, DEFAULT_PROFILE)
    flat_defaults = _flatten(defaults)
    unknown = [key for key in changes if key not in flat_defaults]
    if unknown:
        raise ConfigError(
            f"profile {name!r}: unknown key {', '.join(unknown)} (not a param of "
            f"{PROFILES_DIR}/{DEFAULT_PROFILE}.yaml)"
        )
    try:
        parse_params(override(defaults, changes))
    except ConfigError as err:
        raise ConfigError(f"profile {name!r} over {DEFAULT_PROFILE}.yaml: {err}") from None
    return {**flat_defaults, **changes}


def resolve_overrides(root: Path, profile: str | None, sets: list[str]) -> dict[str, Any]:
    """A run's overrides, as dotted keys: with a profile, every param (the defaults, the
    profile, then each --set); without one, only the --set keys, so params.yaml as it
    stands, hand edits included, holds the rest."""
    overrides = profile_overrides(root, profile) if profile else {}
    overrides.update(parse_set(expr) for expr in sets)
    return overrides


def apply_overrides(root: Path, overrides: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """Write overrides into params.yaml (comments kept, atomic) and return the new params.

    Returns the params and the keys whose value changed, old and new; only those are
    written. Nothing is written when the result would be invalid.
    """
    raw = read_raw(root)
    flat_before = _flatten(raw)
    params = parse_params(override(raw, overrides))
    changed = {
        key: {"from": flat_before.get(key), "to": value}
        for key, value in overrides.items()
        if flat_before.get(key) != value
    }
    if changed:
        _write_round_trip(root / PARAMS_FILE, {key: c["to"] for key, c in changed.items()})
    return params, changed


def _yaml11_float(representer: Any, value: float) -> Any:
    """`1e-05` is a string to YAML 1.1 readers (PyYAML, which loads params): write `1.0e-05`."""
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    if text in {"inf", "-inf", "nan"}:
        text = {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}[text]
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _write_round_trip(path: Path, overrides: dict[str, Any]) -> None:
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    round_trip.representer.add_representer(float, _yaml11_float)
    document = round_trip.load(path.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        node = document
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if isinstance(value, list):  # inline, as params.yaml writes every list
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        node[leaf] = value
    buffer = io.StringIO()
    round_trip.dump(document, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
