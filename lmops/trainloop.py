"""What pretraining and fine-tuning share: device and precision, optimiser and schedule,
seeding, metrics logging, and the FLOPs bookkeeping behind tokens/s and MFU.

Device placement and data parallelism come from Hugging Face Accelerate, so the same
stage code runs on a CPU, one GPU, or several under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmops.config import OptimConfig


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

    return Live(dir=str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention (nanoGPT/PaLM estimate)."""
    return 6 * n_params + 12 * layers * hidden * seq_len


def peak_flops(accelerator: Any) -> float | None:
    """Dense peak of the device for MFU, where known (bf16 tensor cores on NVIDIA GPUs)."""
    import torch

    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    for marker, peak in (
        ("H200", 989e12),
        ("H100", 989e12),
        ("A100", 312e12),
        ("L4", 121e12),
        ("A10", 125e12),
    ):
        if marker in name:
            return peak
    return None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
