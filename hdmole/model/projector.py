"""SLAM-LLM's "linear" projector: frame concatenation by k, then Linear-ReLU-Linear.

The linears are named `linear1` and `linear2` so adapter target patterns can name them
(`hdmole.adapters.inject(model.projector, cfg)` with target_modules matching these names).
"""
from __future__ import annotations

import torch
from torch import nn


def projected_lengths(encoder_lens: torch.Tensor, k: int) -> torch.Tensor:
    """Speech tokens per utterance: the trailing `T mod k` encoder frames are dropped."""
    return encoder_lens // k


class FrameConcatProjector(nn.Module):
    def __init__(self, encoder_dim: int, llm_dim: int, k: int, hidden: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"projector_downsample must be >= 1, got {k}")
        self.k = k
        self.linear1 = nn.Linear(encoder_dim * k, hidden)
        self.act = nn.ReLU()
        self.linear2 = nn.Linear(hidden, llm_dim)

    def concat_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T // k, D * k); frame j of token i is x[:, i*k + j]."""
        b, t, d = x.shape
        n = t // self.k
        return x[:, : n * self.k].reshape(b, n, d * self.k)

    def forward(self, x: torch.Tensor, encoder_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.concat_frames(x)
        return self.linear2(self.act(self.linear1(x))), projected_lengths(encoder_lens, self.k)
