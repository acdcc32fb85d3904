"""Training section of the experiment config (`train:` in Hydra)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Optimisation, validation and checkpointing of one training run.

    Steps count optimiser updates (one update = `accum_steps` micro-batches).
    The run stops at the first of: max_steps, max_epochs, max_minutes, early stopping.
    """

    seed: int = 1234
    max_steps: int = 1000
    max_epochs: int = 100
    # Wall-clock budget (0 = none). Keeps CPU recipes inside their time budget; the loop
    # validates and saves before stopping, so a budget stop is a normal end.
    max_minutes: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    schedule: str = "cosine"  # see hdmole.train.schedule.SCHEDULES
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # final lr = lr * min_lr_ratio for decaying schedules
    # Decay over whichever budget runs out first: progress = max(step share of max_steps,
    # elapsed share of max_minutes). A wall-clock-budgeted run (GPU base training, whose step
    # rate is not known in advance) then still anneals to min_lr by its end.
    decay_by_time: bool = False
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Optimiser steps whose gradient is non-finite may be skipped (zeroed, counted, logged with
    # their utterance ids) up to this many in a run; one more stops training. 0 = stop at the
    # first, for debugging. A non-finite *loss* always stops (it names the layer).
    max_skipped_steps: int = 0
    accum_steps: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume tests)
    # Under torchrun (world size > 1): ddp (replicated model; adapter training) or fsdp (FSDP2,
    # sharded parameters/gradients/Adam states; full fine-tuning at 7B). See docs/scaling.md.
    parallel: str = "ddp"
    # DDP: search the graph for parameters without gradient every step. Every preset uses all
    # its trainable parameters (tested), so off; the first step checks it and names the key.
    find_unused_parameters: bool = False
    # Validation: every `valid_every` steps (0 = only at the end) on at most
    # `valid_max_batches` dev batches (0 = all). Early stopping on `metric` (lower is better).
    valid_every: int = 100
    valid_max_batches: int = 0
    metric: str = "cer"  # cer | loss
    valid_at_start: bool = False  # validate the initial weights (adaptation: "best" may be step 0)
    early_stop_patience: int = 0  # validations without improvement before stopping; 0 = never
    save_every: int = 0  # write the resumable `last` checkpoint every N steps; 0 = at validations
    log_every: int = 10
    resume: bool = True  # continue from exp_dir/checkpoints/last.pt when present
    # Directory of a finished run (its exported `model/`) whose trainable weights initialise
    # this run, e.g. the base model for adaptation. Empty = start from the model config.
    init_from: str = ""
