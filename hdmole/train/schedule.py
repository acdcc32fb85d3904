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


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float,
                  time_progress: float = 0.0) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based). `time_progress`: share of
    a wall-clock budget already used; the decay follows the larger of it and the step share."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r} unknown; choose one of {sorted(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps, time_progress))
    return SCHEDULES[schedule](progress, min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str,
                    min_ratio: float, time_progress: Callable[[], float] | None = None
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """`time_progress()`: share of the wall-clock budget used so far (decay_by_time), else None."""
    lr_multiplier(0, warmup_steps, total_steps, schedule, min_ratio)  # validates the name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, schedule, min_ratio,
                                              time_progress() if time_progress is not None else 0.0))
