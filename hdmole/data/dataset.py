"""Cut sets -> Whisper log-mel -> `hdmole.batch.Batch`, with lhotse samplers (DDP aware).

Features come from lhotse's storage (stage 1, `hdmole.data.features`) or are computed on the
fly with the same extractor; `num_mel_bins` is passed in by the caller from the encoder config
(`model.num_mel_bins`), never typed here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hdmole.batch import Batch
from hdmole.data.accents import accent_id
from hdmole.data.config import DataConfig
from hdmole.data.features import SAMPLE_RATE, LogMelExtractor, load_cut_features


def _cut_audio(cut) -> np.ndarray:
    if cut.sampling_rate != SAMPLE_RATE:
        cut = cut.resample(SAMPLE_RATE)
    audio = cut.load_audio()
    return audio[0] if audio.ndim == 2 else audio


def cut_accent(cut) -> int:
    """Accent id of a cut from supervision.language; -1 when the cut has no label."""
    language = cut.supervisions[0].language if cut.supervisions else None
    return accent_id(language) if language else -1


class AsrDataset(torch.utils.data.Dataset):
    """Map-style dataset for lhotse samplers: a CutSet (one batch) -> Batch. Features are read
    from lhotse's storage (`precomputed`, stage 1) or computed from the audio."""

    def __init__(self, num_mel_bins: int, precomputed: bool = False) -> None:
        self.num_mel_bins = num_mel_bins
        self.extractor = None if precomputed else LogMelExtractor(num_mel_bins)

    def features(self, cut) -> np.ndarray:
        if self.extractor is None:
            return load_cut_features(cut, self.num_mel_bins)
        return self.extractor(_cut_audio(cut))

    def __getitem__(self, cuts) -> Batch:
        return collate([c.id for c in cuts], [self.features(c) for c in cuts], [cut_accent(c) for c in cuts],
                       [c.supervisions[0].text or "" if c.supervisions else "" for c in cuts])


def collate(ids: list[str], features: list[np.ndarray], accents: list[int], texts: list[str]) -> Batch:
    """Right-pad (mels, T_i) features with zeros to the longest T in the batch."""
    if not features:
        raise ValueError("collate: empty batch")
    mels = {f.shape[0] for f in features}
    if len(mels) != 1:
        raise ValueError(f"collate: features disagree on mel bins {sorted(mels)}")
    lens = torch.tensor([f.shape[1] for f in features], dtype=torch.int64)
    padded = torch.zeros(len(features), mels.pop(), int(lens.max()), dtype=torch.float32)
    for i, f in enumerate(features):
        padded[i, :, : f.shape[1]] = torch.from_numpy(f)
    return Batch(ids=list(ids), features=padded, feature_lens=lens,
                 accents=torch.tensor(accents, dtype=torch.int64), texts=list(texts))


def _bucketing(cuts, cfg: DataConfig, **kw):
    from lhotse.dataset import DynamicBucketingSampler

    return DynamicBucketingSampler(cuts, max_duration=cfg.batch_duration, max_cuts=cfg.max_batch_size,
                                   num_buckets=cfg.num_buckets, **kw)


def _simple(cuts, cfg: DataConfig, **kw):
    from lhotse.dataset import SimpleCutSampler

    return SimpleCutSampler(cuts, max_duration=cfg.batch_duration, max_cuts=cfg.max_batch_size, **kw)


SAMPLER_FACTORIES = {"bucketing": _bucketing, "simple": _simple}


def cuts_by_accent(cuts) -> dict[str, object]:
    """One CutSet per accent label (supervision.language; AISHELL's "Chinese" -> "Mandarin")."""
    from lhotse import CutSet

    from hdmole.data.accents import LABEL_ALIASES

    groups: dict[str, list] = {}
    for cut in cuts:
        label = cut.supervisions[0].language if cut.supervisions else None
        groups.setdefault(LABEL_ALIASES.get(label, label) or "unknown", []).append(cut)
    return {label: CutSet.from_cuts(items) for label, items in sorted(groups.items())}


def load_cuts(path: str | Path):
    from lhotse import load_manifest_lazy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cut set {path}; run stage 1 (python -m hdmole.bin.prepare cuts/features)")
    return load_manifest_lazy(path)


def make_dataloader(cuts, cfg: DataConfig, num_mel_bins: int, shuffle: bool, rank: Optional[int] = None,
                    world_size: Optional[int] = None, seed: int = 0, drop_last: Optional[bool] = None,
                    num_workers: Optional[int] = None) -> torch.utils.data.DataLoader:
    """DataLoader of `Batch`es over `cuts` (a CutSet or a path to one).

    rank/world_size: each DDP rank gets its own share; drop_last defaults to True when
    world_size > 1 (uneven final batches hang DDP). Call `loader.sampler.set_epoch(e)` per epoch.
    """
    if isinstance(cuts, (str, Path)):
        cuts = load_cuts(cuts)
    world_size = world_size or 1
    if drop_last is None:
        drop_last = world_size > 1
    sampler = SAMPLER_FACTORIES[cfg.sampler](cuts, cfg, shuffle=shuffle, drop_last=drop_last,
                                             world_size=world_size, rank=rank or 0, seed=seed)
    workers = cfg.num_workers if num_workers is None else num_workers
    return torch.utils.data.DataLoader(AsrDataset(num_mel_bins, cfg.feature_storage is not None), sampler=sampler,
                                       batch_size=None, num_workers=workers, persistent_workers=False)
