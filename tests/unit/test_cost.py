"""What a stage cost (lmops/cost.py): real CPU work measured by the meter and by
codecarbon, the sums the model card shows, and the faults an estimate must survive."""

from __future__ import annotations

import time

import pytest

from lmops.artifacts import COST_HEADER, StageCost, TrainingCost
from lmops.config import CostConfig
from lmops.cost import Meter, work_of
from lmops.tasks.promote import relative_gates


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_meter_counts_cpu_work_and_not_waiting() -> None:
    with Meter("spin", CostConfig(energy="none", country_iso_code=None)) as meter:
        _spin(0.4)
        time.sleep(0.4)
    cost = meter.record(tokens=1000, flops=2e9, mfu=None)
    assert 0.75 < cost.wall_seconds < 1.5
    assert 0.3 < cost.cpu_seconds < 0.7  # the spin, not the sleep
    assert cost.gpu_seconds == 0 and cost.peak_gpu_memory_mb is None
    assert cost.peak_memory_mb > 10
    assert cost.flops_per_second == pytest.approx(2e9 / cost.wall_seconds, rel=0.01)
    assert cost.energy_kwh is None and "cost.energy: none" in cost.energy_method


def test_codecarbon_estimates_energy_offline_and_co2_at_the_named_grid() -> None:
    runs = {}
    for country in ("FRA", "POL"):
        with Meter("spin", CostConfig(energy="codecarbon", country_iso_code=country)) as meter:
            _spin(1.0)
        runs[country] = meter.record(None, None, None)
    for cost in runs.values():
        assert cost.energy_kwh is not None and cost.energy_kwh > 0
        assert cost.energy_method.startswith("codecarbon ")
    assert "the FRA grid" in runs["FRA"].energy_method
    # Per kWh, Poland's coal-heavy grid emits several times France's nuclear-heavy one.
    intensity = {c: r.emissions_kg_co2e / r.energy_kwh for c, r in runs.items()}
    assert intensity["POL"] > 3 * intensity["FRA"]


def test_an_unknown_country_keeps_the_energy_and_says_why_there_is_no_co2() -> None:
    with Meter("spin", CostConfig(energy="codecarbon", country_iso_code="ZZZ")) as meter:
        _spin(0.3)
    cost = meter.record(None, None, None)
    assert cost.energy_kwh is not None and cost.emissions_kg_co2e is None
    assert "no CO2e: codecarbon has no grid data for ZZZ" in cost.energy_method


def test_a_tracker_that_cannot_start_never_fails_the_stage(monkeypatch) -> None:
    import codecarbon

    def broken(*args: object, **kwargs: object) -> None:
        raise PermissionError("/sys/class/powercap: permission denied")

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", broken)
    with Meter("spin", CostConfig(energy="codecarbon", country_iso_code=None)) as meter:
        _spin(0.1)
    cost = meter.record(None, None, None)
    assert cost.energy_kwh is None and cost.cpu_seconds > 0.05
    assert "unavailable: codecarbon could not start (/sys/class/powercap" in cost.energy_method


def test_work_comes_from_a_training_stage_result_only() -> None:
    assert work_of({"tokens_this_run": 5, "flops_this_run": 7.0, "mfu": 0.3}) == {
        "tokens": 5,
        "flops": 7.0,
        "mfu": 0.3,
    }
    assert work_of(None) == {"tokens": None, "flops": None, "mfu": None}


def _cost(stage: str, wall: float, energy: float | None, tokens: int | None) -> StageCost:
    return StageCost(
        stage=stage,
        wall_seconds=wall,
        cpu_seconds=wall * 2,
        gpu_seconds=0.0,
        peak_memory_mb=wall * 100,
        tokens=tokens,
        flops=tokens and tokens * 1e6,
        energy_kwh=energy,
        energy_method="m",
    )


def test_the_total_sums_stages_and_takes_the_largest_peak() -> None:
    stages = {
        "ingest": _cost("ingest", 2.0, 0.001, None),
        "pretrain": _cost("pretrain", 10.0, None, 500),
    }
    total = StageCost.total(list(stages.values()))
    assert (total.wall_seconds, total.cpu_seconds, total.peak_memory_mb) == (12.0, 24.0, 1000.0)
    assert total.tokens == 500 and total.flops == 5e8 and total.energy_kwh == 0.001
    table = TrainingCost(stages=stages, total=total).table()
    assert table[0] == COST_HEADER
    assert table[-1].startswith("| total | 12.0 | 24.0 |")
    assert "| 500 | 5e+08 | - |" in table[2]  # tokens, FLOPs, no MFU on a CPU


def _measured(challenger_cost: float) -> dict:
    figures = {"accuracy": 0.8, "macro_f1": 0.8, "p50_latency_ms": 1.0, "predicted": ["a"]}
    return {
        "test_rows": 1,
        "targets": ["a"],
        "models": {
            "v2": {**figures, "cpu_ms_per_1k_texts": challenger_cost},
            "v1": {**figures, "cpu_ms_per_1k_texts": 100.0},
        },
    }


@pytest.mark.parametrize(("challenger_cost", "passed"), [(124.0, True), (126.0, False)])
def test_the_cost_gate_caps_serving_cost_growth(challenger_cost: float, passed: bool) -> None:
    from lmops.config import load_params
    from tests.conftest import REPO_ROOT

    cfg = load_params(REPO_ROOT).promotion  # max_cost_increase: 0.25
    gates = relative_gates(_measured(challenger_cost), "v2", "v1", cfg)
    (cost,) = [g for g in gates if g["gate"] == "cost_vs_prod"]
    assert cost["passed"] is passed
    assert cost["threshold"] == "<= 125.0 (100.0 + 25%)"


def test_a_stage_forked_by_a_big_process_reports_its_own_peak() -> None:
    """Linux carries ru_maxrss over fork and exec: a stage run by a 1 GB flow would report
    1 GB. The meter reads its own address space's peak (VmHWM) instead."""
    import subprocess
    import sys

    held = bytearray(1 << 30)
    held[:: 1 << 12] = b"\x01" * len(held[:: 1 << 12])  # touch every page: resident
    child = "from lmops.cost import _peak_memory_mb; print(_peak_memory_mb())"
    reported = float(
        subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, check=True
        ).stdout
    )
    assert len(held) == 1 << 30
    assert reported < 500, f"the child reported its parent's peak: {reported:.0f} MB"
