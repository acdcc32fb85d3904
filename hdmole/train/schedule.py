"""Learning-rate schedules: linear warm-up, then a decay chosen by name (a small registry)."""
from __future__ import annotations

import math
from typing import Callable

import torch

# Each maps progress in [0, 1] after warm-up to a multiplier in [min_ratio, 1].
Decay = Callable[[float, float], float]

SCHEDULES: dict[str, Decay] = {
    "constant": lambda progress, min_ratio: 1.0,
    "linear": lambda progress, min_ratio: 1.0 - (1.0 - min_ratio) * progress,
    "cosine": lambda progress, min_ratio: min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r} unknown; choose one of {sorted(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return SCHEDULES[schedule](progress, min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    lr_multiplier(0, warmup_steps, total_steps, schedule, min_ratio)  # validates the name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, schedule, min_ratio))
