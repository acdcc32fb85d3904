"""SpecAugment (frequency and time masking) on padded log-mel batches, valid frames only."""
from __future__ import annotations

import torch

from hdmole.model.config import ModelConfig

MAX_TIME_MASK_SHARE = 0.2


def spec_augment(features: torch.Tensor, lens: torch.Tensor, cfg: ModelConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, mels, T) -> masked copy; masks are filled with each utterance's mean over valid frames."""
    if cfg.specaug_freq_masks <= 0 and cfg.specaug_time_masks <= 0:
        return features
    b, mels, t = features.shape
    device = features.device
    frames = torch.arange(t, device=device)
    valid = frames[None, :] < lens[:, None]
    mean = (features * valid[:, None, :]).sum((1, 2)) / (lens.clamp(min=1) * mels)
    mask = torch.zeros((b, mels, t), dtype=torch.bool, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    bins = torch.arange(mels, device=device)
    for _ in range(cfg.specaug_freq_masks):
        width = (rand(b) * (cfg.specaug_freq_width + 1)).long()
        start = (rand(b) * (mels - width + 1)).long()
        mask |= ((bins[None, :] >= start[:, None]) & (bins[None, :] < (start + width)[:, None]))[:, :, None]
    max_width = torch.minimum(torch.full_like(lens, cfg.specaug_time_width), (lens * MAX_TIME_MASK_SHARE).long())
    for _ in range(cfg.specaug_time_masks):
        width = (rand(b) * (max_width + 1)).long()
        start = (rand(b) * (lens - width + 1).clamp(min=1)).long()
        mask |= ((frames[None, :] >= start[:, None]) & (frames[None, :] < (start + width)[:, None]))[:, None, :]
    mask &= valid[:, None, :]
    return torch.where(mask, mean[:, None, None].to(features.dtype), features)
