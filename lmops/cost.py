"""What a stage cost: wall, CPU and GPU seconds, peak memory, the work it did (tokens,
FLOPs, MFU) and an energy estimate, written to reports/cost/STAGE.json by `lmops stage`.

Energy comes from codecarbon's offline tracker, in its per-process mode: RAPL counters
where the kernel exposes them, else the CPU's TDP (4 W a thread for a model it does not
know) times this process's CPU load, plus RAM and, through NVML, GPU power. Its figure is
an estimate and the record says which sources it used. The tracker never fails a stage:
if it cannot start, the record says why and has no energy figure.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

from lmops.artifacts import StageCost
from lmops.config import CostConfig

log = logging.getLogger(__name__)


def _cpu_seconds() -> float:
    """User and system time of this process and the children it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _own_peak_kib() -> int:
    """This process's peak resident set. On Linux its address space's (VmHWM): ru_maxrss
    carries over fork and exec, so a stage run by a 2 GB flow would report 2 GB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# What this process inherited from whatever forked it (Linux reports KiB).
_INHERITED_KIB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_memory_mb() -> float:
    """Peak resident set of this process or its largest child. A child's ru_maxrss carries
    this process's, inherited figure included, at the fork: it is the child's own only
    where it is above both."""
    own = _own_peak_kib()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (children if children > max(own, _INHERITED_KIB) else own) / 1024


def _gpu_in_use() -> tuple[int, float | None]:
    """(devices, peak MB allocated) if this process ran anything on CUDA, else (0, None).
    torch is only looked at if the stage imported it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0, None
    devices = [i for i in range(torch.cuda.device_count()) if torch.cuda.max_memory_allocated(i)]
    peak = max((torch.cuda.max_memory_allocated(i) for i in devices), default=0)
    return len(devices), round(peak / 2**20, 1)


class Meter:
    """`with Meter(stage, cfg) as meter:` around a stage; then `meter.record(...)`."""

    def __init__(self, stage: str, cfg: CostConfig) -> None:
        self.stage, self.cfg = stage, cfg
        self.tracker: Any = None
        self.grid_problem: str | None = None
        self.energy_method = "not estimated (cost.energy: none)"

    def __enter__(self) -> Meter:
        if self.cfg.energy == "codecarbon":
            self._start_tracker()
        self.started, self.cpu_started = time.perf_counter(), _cpu_seconds()
        return self

    def _start_tracker(self) -> None:
        try:
            from codecarbon import OfflineEmissionsTracker
            from codecarbon.input import DataSource

            country = self.cfg.country_iso_code
            if country and country not in DataSource().get_global_energy_mix_data():
                # codecarbon would log an error and quietly use the world average instead.
                self.grid_problem = f"codecarbon has no grid data for {country}"
                country = None

            # codecarbon logs its hardware probing at WARNING; the record says what it used.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self.tracker = OfflineEmissionsTracker(
                project_name=f"lmops-{self.stage}",
                country_iso_code=country,
                tracking_mode="process",
                output_methods=[],  # the record is ours: no emissions.csv
                log_level="error",
            )
            self.tracker.start()
        except Exception as err:  # an estimate is never worth a failed stage
            self.tracker = None
            self.energy_method = f"unavailable: codecarbon could not start ({err})"
            log.warning("cost: %s: %s", self.stage, self.energy_method)

    def __exit__(self, *exc: object) -> None:
        self.wall_seconds = time.perf_counter() - self.started
        self.cpu_seconds = _cpu_seconds() - self.cpu_started
        self.energy: dict[str, float | None] = {}
        if self.tracker is None:
            return
        try:
            emissions = self.tracker.stop()
            data = self.tracker.final_emissions_data
            self.energy = {
                "kwh": data.energy_consumed,
                "kg": None if self.grid_problem else emissions,
            }
            grid = self.cfg.country_iso_code or "world-average"
            self.energy_method = (
                f"codecarbon {data.codecarbon_version}, offline, this process's share of "
                f"{data.cpu_model or 'an unknown CPU'}, RAM and {data.gpu_count or 0} GPU(s); "
                + (
                    f"no CO2e: {self.grid_problem}"
                    if self.grid_problem
                    else f"CO2e at the {grid} grid's intensity"
                )
            )
        except Exception as err:
            self.energy_method = f"unavailable: codecarbon failed ({err})"
            log.warning("cost: %s: %s", self.stage, self.energy_method)

    def record(self, tokens: int | None, flops: float | None, mfu: float | None) -> StageCost:
        """The stage's cost, with the work it reports (None for stages that do not train)."""
        devices, gpu_peak = _gpu_in_use()
        wall = self.wall_seconds
        return StageCost(
            stage=self.stage,
            wall_seconds=round(wall, 2),
            cpu_seconds=round(self.cpu_seconds, 2),
            gpu_seconds=round(wall * devices, 2),
            peak_memory_mb=round(_peak_memory_mb(), 1),
            peak_gpu_memory_mb=gpu_peak,
            tokens=tokens,
            flops=flops,
            flops_per_second=round(flops / wall, 1) if flops and wall > 0 else None,
            mfu=mfu,
            energy_kwh=self.energy.get("kwh"),
            emissions_kg_co2e=self.energy.get("kg"),
            energy_method=self.energy_method,
        )


def work_of(result: Any) -> dict[str, Any]:
    """The work figures a stage's result reports: the training stages return
    `tokens_this_run` and `flops_this_run` (a resumed run's earlier steps are not in them)
    and, on a GPU, `mfu`."""
    if not isinstance(result, dict):
        return {"tokens": None, "flops": None, "mfu": None}
    return {
        "tokens": result.get("tokens_this_run"),
        "flops": result.get("flops_this_run"),
        "mfu": result.get("mfu"),
    }
