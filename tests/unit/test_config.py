from pathlib import Path

import pytest
import yaml

from lmops.config import (
    PROFILES_DIR,
    _flatten,
    apply_overrides,
    load_params,
    parse_params,
    parse_set,
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
    assert params.data.source == "builtin:zh-reviews"
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


def test_set_values_are_read_as_yaml() -> None:
    assert parse_set("data.split.seed=3") == ("data.split.seed", 3)
    assert parse_set("data.max_rows=null") == ("data.max_rows", None)
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


def test_every_profile_sets_the_same_keys() -> None:
    """Else switching from one profile to another would keep the first one's values."""
    key_sets = {
        path.stem: set(_flatten(yaml.safe_load(path.read_text("utf-8"))))
        for path in (REPO_ROOT / PROFILES_DIR).glob("*.yaml")
    }
    assert len(key_sets) >= 2
    assert len({frozenset(keys) for keys in key_sets.values()}) == 1, key_sets


def test_profiles_apply_to_valid_params(project: Path) -> None:
    for path in (project / PROFILES_DIR).glob("*.yaml"):
        params, _ = apply_overrides(project, resolve_overrides(project, path.stem, []))
        assert params.data.split.seed == 0
