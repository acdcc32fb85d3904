"""The one batch type that crosses from the data pipeline into the model.

The data side (`hdmole.data`) builds it; the model (`hdmole.model`) consumes it and knows
nothing else about the data pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    """A padded mini-batch of utterances, keyed by utterance id.

    features:      (B, num_mel_bins, T) float32 Whisper-normalised log-mel at 100 frames/s,
                   right-padded with zeros to the longest utterance (not to 30 s).
    feature_lens:  (B,) int64 number of valid mel frames per utterance.
    accents:       (B,) int64 index into `hdmole.data.accents.ACCENTS`, -1 when unknown.
    texts:         normalised reference transcripts ("" when unknown, e.g. at decoding).
    """

    ids: list[str]
    features: torch.Tensor
    feature_lens: torch.Tensor
    accents: torch.Tensor
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.features.dim() != 3 or self.features.shape[0] != n:
            raise ValueError(f"Batch.features must be (B={n}, mels, T), got {tuple(self.features.shape)}")
        if self.feature_lens.shape != (n,) or self.accents.shape != (n,):
            raise ValueError("Batch.feature_lens and Batch.accents must have shape (B,)")
        if self.texts and len(self.texts) != n:
            raise ValueError(f"Batch.texts has {len(self.texts)} entries for {n} ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def feature_mask(self) -> torch.Tensor:
        """(B, T) bool, True on valid frames."""
        frames = torch.arange(self.features.shape[-1], device=self.features.device)
        return frames[None, :] < self.feature_lens[:, None]

    def to(self, device: torch.device | str) -> "Batch":
        return replace(
            self,
            features=self.features.to(device, non_blocking=True),
            feature_lens=self.feature_lens.to(device, non_blocking=True),
            accents=self.accents.to(device, non_blocking=True),
        )
