"""Training: loop, optimiser/scheduler, checkpoints and resume, logging, torchrun set-up."""
from hdmole.train.config import TrainConfig

__all__ = ["TrainConfig"]
