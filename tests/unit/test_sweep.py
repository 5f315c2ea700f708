"""A sweep's grid, its resumption, and the comparison that chooses on validation only."""

from __future__ import annotations

import statistics

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


def test_the_plan_is_the_grid_times_the_seeds_and_its_name_is_stable() -> None:
    sets = ["finetune.learning_rate=1e-4,5e-4", "model.layers=2,4"]
    points = sweep.plan(sets, [0, 1])
    assert len(points) == 8
    assert points[0].config == {"finetune.learning_rate": 1e-4, "model.layers": 2}
    assert [p.seed for p in points[:2]] == [0, 1]
    assert points[1].sets("data.split.seed") == [
        "finetune.learning_rate=0.0001",
        "model.layers=2",
        "data.split.seed=1",
    ]
    name = sweep.sweep_name("tiny", sets, [0, 1], "data.split.seed")
    assert name == sweep.sweep_name("tiny", list(sets), [0, 1], "data.split.seed")
    assert name != sweep.sweep_name("tiny", sets, [0, 2], "data.split.seed")
    assert len(sweep.plan(sets, None)) == 4


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
    points = sweep.plan(["model.layers=2,4"], [0, 1])
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
