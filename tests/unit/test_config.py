from pathlib import Path

import pytest
import yaml

from lmops.config import (
    DEFAULT_PROFILE,
    PROFILES_DIR,
    _flatten,
    apply_overrides,
    load_params,
    override,
    parse_params,
    parse_set,
    profile_overrides,
    read_raw,
    resolve_overrides,
)
from lmops.errors import ConfigError
from tests.conftest import REPO_ROOT


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text("utf-8"), "utf-8")
    (tmp_path / PROFILES_DIR).mkdir()
    for profile in (REPO_ROOT / PROFILES_DIR).glob("*.yaml"):
        (tmp_path / PROFILES_DIR / profile.name).write_text(profile.read_text("utf-8"), "utf-8")
    return tmp_path


def test_repository_params_load() -> None:
    params = load_params(REPO_ROOT)
    assert params.data.source == "builtin:en-movie-reviews"
    assert params.validation.labels == "auto"


def test_unknown_key_is_named_with_its_dotted_path(repo_params_raw: dict) -> None:
    raw = {**repo_params_raw, "data": {**repo_params_raw["data"], "sead": 1}}
    with pytest.raises(ConfigError, match=r"data\.sead: unknown key"):
        parse_params(raw)


def test_wrong_type_is_named_with_its_dotted_path(repo_params_raw: dict) -> None:
    split = {**repo_params_raw["data"]["split"], "seed": "zero"}
    raw = {**repo_params_raw, "data": {**repo_params_raw["data"], "split": split}}
    with pytest.raises(ConfigError, match=r"data\.split\.seed: .*integer"):
        parse_params(raw)


def test_missing_key_is_named(repo_params_raw: dict) -> None:
    data = {k: v for k, v in repo_params_raw["data"].items() if k != "corpus"}
    with pytest.raises(ConfigError, match=r"data\.corpus: missing key"):
        parse_params({**repo_params_raw, "data": data})


def test_out_of_range_value_is_rejected(repo_params_raw: dict) -> None:
    validation = {**repo_params_raw["validation"], "min_class_share": 1.5}
    with pytest.raises(ConfigError, match=r"validation\.min_class_share"):
        parse_params({**repo_params_raw, "validation": validation})


def test_init_from_without_fine_tuning_from_it_is_refused(repo_params_raw: dict) -> None:
    model = {**repo_params_raw["model"], "init_from": "checkpoint"}
    finetune = {**repo_params_raw["finetune"], "from_pretrained": False}
    raw = {**repo_params_raw, "model": model, "finetune": finetune}
    with pytest.raises(
        ConfigError, match=r"model\.init_from \(checkpoint\) needs finetune\.from_pretrained=true"
    ) as refused:
        parse_params(raw)
    # The message is the rule, not a dump of every param.
    assert "orchestration" not in str(refused.value)
    parse_params({**raw, "finetune": {**finetune, "from_pretrained": True}})


def test_set_values_are_read_as_yaml() -> None:
    assert parse_set("data.split.seed=3") == ("data.split.seed", 3)
    assert parse_set("data.max_rows=null") == ("data.max_rows", None)
    # Floats as people write them (YAML 1.1 would read these as strings); quoted stays text.
    assert parse_set("finetune.learning_rate=5e-5") == ("finetune.learning_rate", 5e-5)
    assert parse_set("pretrain.learning_rate=1E+3") == ("pretrain.learning_rate", 1000.0)
    assert parse_set("finetune.learning_rate=.5e-1") == ("finetune.learning_rate", 0.05)
    assert parse_set("data.source='5e-5'") == ("data.source", "5e-5")
    assert parse_set("data.source=builtin:zh-reviews") == ("data.source", "builtin:zh-reviews")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set("data.split.seed")


def test_overrides_are_written_keeping_comments(project: Path) -> None:
    params, changed = apply_overrides(
        project, resolve_overrides(project, "tiny", ["data.split.seed=7"])
    )
    assert params.data.split.seed == 7
    assert params.data.max_rows == 1500
    assert changed["data.split.seed"] == {"from": 0, "to": 7}
    text = (project / "params.yaml").read_text("utf-8")
    assert "# Every knob of the pipeline." in text
    assert yaml.safe_load(text)["data"]["split"]["seed"] == 7
    assert load_params(project).data.max_rows == 1500


def test_small_floats_written_by_set_read_back_as_floats(project: Path) -> None:
    # ruamel writes 1e-05, which PyYAML (YAML 1.1) reads as the string '1e-05'.
    apply_overrides(project, resolve_overrides(project, None, ["finetune.learning_rate=1.0e-5"]))
    assert load_params(project).finetune.learning_rate == 1e-5
    text = (project / "params.yaml").read_text("utf-8")
    assert yaml.safe_load(text)["finetune"]["learning_rate"] == 1e-5


def test_invalid_override_leaves_params_untouched(project: Path) -> None:
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"data\.split\.seed"):
        apply_overrides(project, {"data.split.seed": "x"})
    with pytest.raises(ConfigError, match=r"unknown key data\.nope"):
        apply_overrides(project, {"data.nope.deeper": 1})
    assert (project / "params.yaml").read_bytes() == before


def test_unknown_profile_lists_the_known_ones(project: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'huge' \(known: .*cpu-demo.*tiny"):
        resolve_overrides(project, "huge", [])


PROFILES = ("tiny", "cpu-demo", "zh", "gpu")


def _defaults() -> dict:
    return _flatten(yaml.safe_load((REPO_ROOT / PROFILES_DIR / "default.yaml").read_text("utf-8")))


def _changes(name: str) -> dict:
    text = (REPO_ROOT / PROFILES_DIR / f"{name}.yaml").read_text("utf-8")
    return _flatten(yaml.safe_load(text) or {})  # cpu-demo changes nothing


def _below_header(text: str) -> str:
    lines = text.splitlines()
    while lines and (not lines[0].strip() or lines[0].startswith("#")):
        lines.pop(0)
    return "\n".join(lines)


def test_defaults_are_the_repository_params() -> None:
    """Runs rewrite params.yaml; profiles/default.yaml keeps what it ships with."""
    defaults = (REPO_ROOT / PROFILES_DIR / "default.yaml").read_text("utf-8")
    params = (REPO_ROOT / "params.yaml").read_text("utf-8")
    assert _flatten(yaml.safe_load(defaults)) == _flatten(yaml.safe_load(params))
    assert _below_header(defaults) == _below_header(params), (
        "profiles/default.yaml must be params.yaml line for line below its header comment"
    )


def test_profiles_are_small_deltas_over_the_defaults() -> None:
    defaults = _defaults()
    for name in PROFILES:
        changes = _changes(name)
        assert len(changes) < len(defaults) / 4, name
        same = [key for key, value in changes.items() if defaults[key] == value]
        assert not same, f"{name} sets defaults: {same}"


def test_each_profile_sets_the_params_it_always_did() -> None:
    """Each profile's params before profiles became deltas: these values, and the
    defaults for every param they do not name."""
    distinctive = {
        "tiny": (
            # 28 before 2026-12-07; then the defaults became the English MiniLM demo, and
            # tiny pins the Chinese data, no base and no n-gram channel (+4), while the
            # defaults' one epoch is its own (-1).
            31,
            {
                "data.source": "builtin:zh-reviews",
                "data.max_rows": 1500,
                "tokenizer.kind": "wordpiece",
                "model.hidden_size": 32,
                "model.init_from": None,
                "pretrain.steps": 20,
                "finetune.learning_rate": 1e-3,
                "finetune.ngram_channel.enabled": False,
                "evaluate.gates.min_accuracy": 0.5,
                "evaluate.gates.relax_baseline": True,
                "evaluate.gates.behavioural.minimum_functionality": 0.0,
                "evaluate.errors.deletion_texts": 20,
            },
        ),
        # The defaults themselves: the English demo from the shipped MiniLM base.
        "cpu-demo": (
            0,
            {
                "data.source": "builtin:en-movie-reviews",
                "model.init_from": "builtin:all-minilm-l6-v2",
                "finetune.epochs": 1,
                "finetune.learning_rate": 1e-4,
                "finetune.ngram_channel.enabled": True,
            },
        ),
        # The Chinese cpu-demo recipe of 2026-12-03, from scratch.
        "zh": (
            13,
            {
                "data.source": "builtin:zh-reviews",
                "data.corpus": "builtin:zh-news",
                "tokenizer.kind": "wordpiece",
                "model.layers": 2,
                "model.input_ngram_order": 3,
                "model.init_from": None,
                "pretrain.texts": ["train"],
                "finetune.from_pretrained": False,
                "finetune.learning_rate": 5e-4,
                "finetune.ngram_channel.enabled": True,
            },
        ),
        # 18 before 2026-12-07; now the Chinese data and no base (+3), while the n-gram
        # channel (-1) and, since the evening of 2026-12-07, lr 1e-4 (-1) are the defaults'.
        "gpu": (
            19,
            {
                "data.source": "builtin:zh-reviews",
                "finetune.learning_rate": 1e-4,
                "model.init_from": None,
                "tokenizer.vocab_size": 16000,
                "model.layers": 8,
                "model.hidden_size": 512,
                "pretrain.steps": 20000,
                "finetune.precision": "bf16",
                "evaluate.ablation": True,
            },
        ),
    }
    defaults = _defaults()
    for name, (changed, values) in distinctive.items():
        effective = profile_overrides(REPO_ROOT, name)
        assert effective.keys() == defaults.keys()
        assert {key: effective[key] for key in values} == values, name
        assert sum(effective[key] != defaults[key] for key in defaults) == changed, name
        assert effective["data.split.seed"] == 0
        assert effective["evaluate.gates.baseline_test.rule"] == "non_inferiority"


def test_switching_profiles_leaves_nothing_behind(project: Path) -> None:
    for first in PROFILES:
        for second in PROFILES:
            apply_overrides(project, resolve_overrides(project, first, ["data.split.seed=5"]))
            apply_overrides(project, resolve_overrides(project, second, []))
            written = _flatten(read_raw(project))
            assert written == {**_defaults(), **_changes(second)}, (first, second)
    apply_overrides(project, resolve_overrides(project, "tiny", []))
    apply_overrides(project, resolve_overrides(project, DEFAULT_PROFILE, []))
    assert _flatten(read_raw(project)) == _defaults()


def test_without_a_profile_a_hand_edit_stays(project: Path) -> None:
    apply_overrides(project, resolve_overrides(project, "gpu", []))
    apply_overrides(project, {"finetune.epochs": 9})  # as if edited by hand
    params, changed = apply_overrides(project, resolve_overrides(project, None, ["model.layers=3"]))
    assert (params.finetune.epochs, params.model.layers, params.evaluate.ablation) == (9, 3, True)
    assert set(changed) == {"model.layers"}


def test_a_profile_key_that_is_not_a_param_is_named(project: Path) -> None:
    (project / PROFILES_DIR / "typo.yaml").write_text("model:\n  layerz: 2\n", "utf-8")
    with pytest.raises(ConfigError, match=r"profile 'typo': unknown key model\.layerz"):
        resolve_overrides(project, "typo", [])
    (project / PROFILES_DIR / "bad.yaml").write_text("model:\n  heads: 3\n", "utf-8")
    with pytest.raises(ConfigError, match=r"profile 'bad' over default\.yaml: .*model"):
        resolve_overrides(project, "bad", [])


def test_profiles_apply_to_valid_params(project: Path) -> None:
    for path in (project / PROFILES_DIR).glob("*.yaml"):
        params, _ = apply_overrides(project, resolve_overrides(project, path.stem, []))
        assert params.data.split.seed == 0


def test_every_bench_recipe_is_valid_params() -> None:
    """A recipe that params refuse would fail only after the bench's earlier runs."""
    from bench import recipes

    candidates = {**recipes.CANDIDATES, **recipes.ZH_CANDIDATES}
    raw = read_raw(REPO_ROOT)
    for name, overrides in candidates.items():
        params = parse_params(override(raw, overrides))
        assert params.finetune.epochs == overrides["finetune.epochs"], name
    # The default recipe is the shipped base; the zh recipes train from scratch.
    assert recipes.CANDIDATES["cpu-demo"]["model.init_from"] == "builtin:all-minilm-l6-v2"
    assert all(c["model.init_from"] is None for c in recipes.ZH_CANDIDATES.values())
    assert all(c["data.source"] == "builtin:zh-reviews" for c in recipes.ZH_CANDIDATES.values())
