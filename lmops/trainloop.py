"""What pretraining and fine-tuning share: device and precision, optimiser and schedule,
seeding, metrics logging, and the FLOPs bookkeeping behind tokens/s and MFU.

Device placement and data parallelism come from Hugging Face Accelerate, so the same
stage code runs on a CPU, one GPU, or several under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmops.config import OptimConfig

log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """AMX tiles for bf16 (Intel Sapphire Rapids and later): there, bf16 autocast trained a
    small BERT ~1.5x faster than fp32. Without them (AVX2, AVX-512 alone) bf16 is emulated
    and slower, so `auto` stays fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "amx_bf16" in flags


def accelerator_for(cfg: OptimConfig) -> Any:
    import torch
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available()
    fast_bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_fast_bf16()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and fast_bf16)
    # cpu=True where there is no GPU: under torchrun that makes Accelerate use gloo across
    # processes (it otherwise looks only for accelerators and runs each process alone).
    return Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available())


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def optimizer_and_schedule(model: Any, cfg: OptimConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW without decay on biases and norms; warm-up then the configured decay."""
    import torch
    from transformers import get_scheduler

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    on_gpu = next(model.parameters()).is_cuda or torch.cuda.is_available()
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        fused=on_gpu,
    )
    schedule = get_scheduler(
        "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        optimizer,
        num_warmup_steps=int(cfg.warmup_fraction * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, schedule


@dataclass(frozen=True)
class LossOutput:
    """What a training wrapper's forward returns: the one field `train_step` reads."""

    loss: Any


def train_step(
    model: Any, inputs: dict[str, Any], accelerator: Any, optimizer: Any, schedule: Any
) -> Any:
    """One optimisation step on a batch; returns the loss (clipped gradients at norm 1)."""
    loss = model(**{k: v.to(accelerator.device) for k, v in inputs.items()}).loss
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def live_logger(directory: Path, resume: bool) -> Any:
    """DVCLive that neither rewrites dvc.yaml nor creates experiments (dvc.yaml declares
    its outputs), so `dvc status` stays clean."""
    from dvclive import Live

    if resume:
        _drop_cut_summary(directory / "metrics.json")
    return Live(dir=str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def _drop_cut_summary(summary: Path) -> None:
    """A kill while DVCLive rewrote its summary (not atomically) leaves it empty or cut
    short, and DVCLive's resume would fail reading it. The callers set the step they
    resume from themselves, so a broken summary is only dropped."""
    try:
        json.loads(summary.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (ValueError, UnicodeDecodeError):
        log.warning("trainloop: %s was cut short by a kill; starting it afresh", summary)
        summary.unlink()


def flops_per_token(
    config: Any, seq_len: int, head_weights: float, head_share: float = 1.0, input_weights: int = 0
) -> float:
    """Training FLOPs per token of a BERT or GPT-2 `config`, counting matmuls only.

    Forward, each weight a token meets in a matmul costs 2 FLOPs (multiply and add), and
    attention's scores and weighted values 2 x 2 x seq_len x hidden per layer; backward is
    twice forward. Embedding tables are lookups and cost nothing. The output head has
    `head_weights` and runs on `head_share` of the tokens (the masked ones of masked-LM, one
    a sequence for a classifier); `input_weights` are those of matmuls before the first
    layer (the n-gram embeddings' projection).
    """
    layers, hidden = config.num_hidden_layers, config.hidden_size
    # BERT's intermediate_size; GPT-2's n_inner, where None means 4 x hidden.
    intermediate = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    per_layer = 4 * hidden * hidden + 2 * hidden * intermediate  # Q, K, V, output; the MLP
    weights = layers * per_layer + input_weights + head_weights * head_share
    attention = layers * 2 * 2 * seq_len * hidden
    return 3 * (2 * weights + attention)


# Dense (no sparsity) peaks from NVIDIA's datasheets, FLOP/s per GPU, by the words of
# torch's device name that tell the model apart (A10 is not A100, L4 not L40S; SXM parts
# name neither PCIe nor NVL). fp16 runs at the bf16 rate on all of them.
_DENSE_PEAKS: tuple[tuple[frozenset[str], dict[str, float]], ...] = tuple(
    (frozenset(words.split()), {"bf16": bf16, "fp16": bf16, "tf32": tf32, "fp32": fp32})
    for words, bf16, tf32, fp32 in (
        ("H200 NVL", 835e12, 418e12, 60e12),
        ("H200", 989e12, 495e12, 67e12),
        ("H100 NVL", 835e12, 418e12, 60e12),
        ("H100 PCIe", 756e12, 378e12, 51e12),
        ("H100", 989e12, 495e12, 67e12),
        ("A100", 312e12, 156e12, 19.5e12),
        ("A10", 125e12, 62.5e12, 31.2e12),
        ("L40S", 362e12, 183e12, 91.6e12),
        ("L40", 181e12, 90.5e12, 90.5e12),
        ("L4", 121e12, 60e12, 30.3e12),
    )
)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU for matmuls in `precision` (bf16, fp16, tf32, fp32),
    where known; None for any other device."""
    words = set(re.split(r"[\s-]+", device_name))
    for markers, peaks in _DENSE_PEAKS:
        if markers <= words:
            return peaks.get(precision)
    return None


def matmul_precision(accelerator: Any) -> str:
    """What the training matmuls run in: bf16 or fp16 under autocast, else fp32 — which
    cuBLAS runs as TF32 where torch allows it (its default is not to, and nothing here
    changes that)."""
    import torch

    if accelerator.mixed_precision in ("bf16", "fp16"):
        return accelerator.mixed_precision
    if accelerator.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def device_peak_flops(accelerator: Any) -> float | None:
    """Dense peak of this process's device at the precision training uses, for MFU; None
    on a CPU or an unknown GPU."""
    import torch

    if accelerator.device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(accelerator.device), matmul_precision(accelerator))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# "bars" (tqdm, for a terminal) or "lines" (a log line every PROGRESS_EVERY_S seconds, for
# log files, CI and the Prefect UI). Unset: bars when stderr is a terminal. The training
# flow sets it for the stages it runs, whose output is a pipe even under a terminal.
PROGRESS_ENV = "LMOPS_PROGRESS"
PROGRESS_EVERY_S = 15.0
PROGRESS_PREFIX = "progress: "


def progress_mode() -> str:
    import os
    import sys

    wanted = os.environ.get(PROGRESS_ENV, "")
    if wanted in ("bars", "lines"):
        return wanted
    return "bars" if sys.stderr.isatty() else "lines"


class LineProgress:
    """tqdm's interface where it is used here (iterate, set_postfix), as periodic log lines
    with the rate and an ETA instead of a redrawn bar: `make run > log` used to write
    156 KB of carriage-return frames."""

    def __init__(self, iterable: Any, desc: str, total: int, initial: int = 0) -> None:
        self.iterable, self.desc, self.total, self.n = iterable, desc, total, initial
        self.postfix = ""
        self.silent = False

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def __iter__(self) -> Any:
        import time

        started = last = time.monotonic()
        first = self.n
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.monotonic()
            if not self.silent and (now - last >= PROGRESS_EVERY_S or self.n == self.total):
                last = now
                rate = (self.n - first) / max(now - started, 1e-9)
                left = (self.total - self.n) / rate if rate > 0 else 0.0
                log.info(
                    "%s%s %d/%d (%.0f%%)%s, %.1f it/s, ETA %d:%02d",
                    PROGRESS_PREFIX,
                    self.desc,
                    self.n,
                    self.total,
                    100 * self.n / max(self.total, 1),
                    f", {self.postfix}" if self.postfix else "",
                    rate,
                    left // 60,
                    left % 60,
                )


def progress(
    iterable: Any, desc: str, total: int | None = None, initial: int = 0, disable: bool = False
) -> Any:
    """A progress display over `iterable`: tqdm bars or log lines (progress_mode())."""
    total = len(iterable) if total is None else total
    if progress_mode() == "lines" or disable:
        shown = LineProgress(iterable, desc, total, initial)
        shown.silent = disable  # processes other than the main one say nothing
        return shown
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial)
