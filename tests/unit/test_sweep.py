"""A sweep's grid, its resumption, and the comparison that chooses on validation only."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from lmops import experiments, sweep
from lmops.artifacts import RunRecord
from lmops.errors import ConfigError, LmopsError

pytestmark = pytest.mark.code


def test_values_parse_as_people_write_them() -> None:
    axes = sweep.grid(
        [
            "finetune.learning_rate=5e-5,1e-3",
            "finetune.ngram_channel.enabled=true,false",
            "data.max_rows=null,1000",
            "pretrain.texts=[corpus],[corpus,train]",
            "data.source='a,b',builtin:en-movie-reviews",
        ]
    )
    assert axes["finetune.learning_rate"] == [5e-5, 1e-3]
    assert axes["finetune.ngram_channel.enabled"] == [True, False]
    assert axes["data.max_rows"] == [None, 1000]
    assert axes["pretrain.texts"] == [["corpus"], ["corpus", "train"]]
    assert axes["data.source"] == ["a,b", "builtin:en-movie-reviews"]


@pytest.mark.parametrize("expr", ["pretrain.texts=[corpus,train", "data.source='a,b", "=1,2"])
def test_a_value_that_cannot_be_parsed_is_one_clear_error(expr: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        sweep.grid([expr])


def _definition(sets: list[str], seeds: list[int] | None, **more: object) -> sweep.Definition:
    return sweep.Definition(grid=sweep.grid(sets), seeds=seeds, **more)


def test_the_plan_is_the_grid_times_the_seeds_and_its_name_is_stable() -> None:
    sets = ["finetune.learning_rate=1e-4,5e-4", "model.layers=2,4"]
    points = _definition(sets, [0, 1]).points()
    assert len(points) == 8
    assert points[0].config == {"finetune.learning_rate": 1e-4, "model.layers": 2}
    assert [p.seed for p in points[:2]] == [0, 1]
    assert points[1].sets("data.split.seed") == [
        "finetune.learning_rate=0.0001",
        "model.layers=2",
        "data.split.seed=1",
    ]
    name = _definition(sets, [0, 1], profile="tiny").name()
    assert name == _definition(list(sets), [0, 1], profile="tiny").name()
    assert name != _definition(sets, [0, 2], profile="tiny").name()
    assert len(_definition(sets, None).points()) == 4


def test_a_sweep_file_names_its_configs_and_crosses_them_with_the_grid(tmp_path: Path) -> None:
    path = tmp_path / "recipes.yaml"
    path.write_text(
        "profile: cpu-demo\n"
        "seeds: [0, 1, 2]\n"
        "configs:\n"
        "  default: {}\n"
        "  lr 1e-4: {finetune.learning_rate: 1e-4}\n"
        "grid:\n"
        "  finetune.epochs: [1, 2]\n",
        encoding="utf-8",
    )
    spec = sweep.Definition.read(path)
    points = spec.points()
    assert len(points) == 2 * 2 * 3
    assert points[-1].label == "lr 1e-4, finetune.epochs=2"
    assert points[-1].config == {"finetune.learning_rate": 1e-4, "finetune.epochs": 2}
    path.write_text("seeds: [0]\nconfig: {}\n", encoding="utf-8")  # a typo'd key
    with pytest.raises(ConfigError, match="sweep file .*recipes.yaml"):
        sweep.Definition.read(path)
    with pytest.raises(ConfigError, match="No such file"):
        sweep.Definition.read(tmp_path / "missing.yaml")


def _run(config: dict, seed: int, val: float, test: float, name: str = "s") -> RunRecord:
    return RunRecord(
        name=f"{name}-{config}-{seed}",
        status="completed",
        started="2026-12-07T18:22:42+00:00",
        wall_seconds=1.0,
        sweep=name,
        config=config,
        seed=seed,
        metrics={
            "val": {"accuracy": val},
            "test": {
                "accuracy": test,
                "margin": 0.01,
                "margin_ci_low": 0.0,
                "margin_ci_high": 0.02,
            },
            "seconds": {"finetune": 10.0, "evaluate": 5.0},
        },
    )


def test_a_point_with_an_experiment_is_done() -> None:
    points = _definition(["model.layers=2,4"], [0, 1]).points()
    runs = [
        _run({"model.layers": 2}, 0, 0.8, 0.8),
        _run({"model.layers": 4}, 1, 0.8, 0.8, name="another sweep"),
        _run({"model.layers": 4}, 0, 0.8, 0.8).model_copy(update={"status": "failed"}),
    ]
    left = sweep.pending(points, "s", runs)
    assert [(p.config["model.layers"], p.seed) for p in left] == [(2, 1), (4, 0), (4, 1)]


def test_compare_pools_seeds_and_ranks_on_validation_only() -> None:
    runs = [
        _run({"lr": 1}, 0, 0.80, 0.99),
        _run({"lr": 1}, 1, 0.82, 0.99),
        _run({"lr": 2}, 0, 0.85, 0.10),  # best on validation, worst on test
        _run({"lr": 2}, 1, 0.86, 0.12),
    ]
    table = experiments.compare(runs, "val.accuracy")
    assert [g["config"] for g in table] == ["lr=2", "lr=1"]
    best = table[0]["metrics"]
    assert best["val.accuracy"]["mean"] == pytest.approx(0.855)
    assert best["val.accuracy"]["std"] == pytest.approx(statistics.stdev([0.85, 0.86]))
    assert table[0]["seeds"] == [0, 1]
    # Poisoning every test figure changes nothing of the choice.
    poisoned = [
        r.model_copy(update={"metrics": {**r.metrics, "test": {"accuracy": 1e9}}}) for r in runs
    ]
    assert [g["config"] for g in experiments.compare(poisoned, "val.accuracy")] == ["lr=2", "lr=1"]
    assert experiments.compare(runs, "val.accuracy", lower_is_better=True)[0]["config"] == "lr=1"
    with pytest.raises(LmopsError, match="rank on a validation metric"):
        experiments.compare(runs, "test.accuracy")
    with pytest.raises(LmopsError, match="not a validation metric of these runs"):
        experiments.compare(runs, "val.f1")


def test_the_report_shows_test_for_the_chosen_config_only() -> None:
    runs = [_run({"lr": 1}, 0, 0.80, 0.70), _run({"lr": 2}, 0, 0.85, 0.75)]
    text = "\n".join(
        experiments.markdown(experiments.compare(runs, "val.accuracy"), "val.accuracy")
    )
    assert "Chosen on validation: **lr=2**" in text
    assert "| accuracy | 0.7500 |" in text and "0.7000" not in text
    assert "reported, not chosen on" in text
    assert "+1.00" in text  # the margin in points with its interval
    page = experiments.page(experiments.compare(runs, "val.accuracy"), "val.accuracy", "t")
    assert "<table>" in page and "http" not in page


@pytest.mark.parametrize("file", ["recipes.yaml", "recipes-scratch.yaml", "recipes-zh.yaml"])
def test_the_recipe_sweeps_are_valid_definitions(file: str) -> None:
    """bench/sweeps/*.yaml (bench/recipes.py's candidates): every point's params parse."""
    from lmops.config import override, parse_params, read_raw, resolve_overrides
    from tests.conftest import REPO_ROOT

    spec = sweep.Definition.read(REPO_ROOT / "bench" / "sweeps" / file)
    points = spec.points()
    assert len(points) == 3 * len(spec.configs) and spec.profile in ("cpu-demo", "zh")
    raw = read_raw(REPO_ROOT)
    for point in points:
        sets = point.sets(spec.seed_key)
        parse_params(override(raw, resolve_overrides(REPO_ROOT, spec.profile, sets)))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--set", "finetune.learning_rate=1e-4,-1"], "finetune.learning_rate"),
        (["--set", "pretrain.texts=[corpus"], "unclosed quote or bracket"),
        (["--seeds", "0,one"], "--seeds '0,one': expected integers"),
        (["--file", "bench/sweeps/recipes.yaml", "--config", "nope"], "--config ['nope']"),
        (["--file", "missing.yaml"], "sweep file missing.yaml"),
    ],
)
def test_a_bad_sweep_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    import shutil

    from typer.testing import CliRunner

    from lmops.cli import app
    from tests.conftest import REPO_ROOT

    for name in ("params.yaml", "profiles", "bench/sweeps"):
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copyfile
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO_ROOT / name, tmp_path / name)
    before = (tmp_path / "params.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", *args])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and says in result.output
    assert (tmp_path / "params.yaml").read_bytes() == before
    assert not (tmp_path / "reports").exists()
