"""Cut sets -> Whisper log-mel -> `hdmole.batch.Batch`, with lhotse samplers (DDP aware).

The same `LogMelExtractor` serves training and decoding; `num_mel_bins` is passed in by the
caller from the encoder config (`model.num_mel_bins`), never typed here.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from hdmole.batch import Batch
from hdmole.data.accents import accent_id
from hdmole.data.config import DataConfig
from hdmole.fileio import atomic_output

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # 100 frames per second


class LogMelExtractor:
    """Whisper-normalised log-mel (transformers' WhisperFeatureExtractor), unpadded: len//160 frames."""

    def __init__(self, num_mel_bins: int) -> None:
        from transformers import WhisperFeatureExtractor

        self.num_mel_bins = num_mel_bins
        self._fe = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """(num_samples,) float audio at 16 kHz -> (num_mel_bins, num_samples // 160) float32."""
        feats = self._fe(samples.astype(np.float32), sampling_rate=SAMPLE_RATE, padding="longest",
                         truncation=False, return_tensors="np")["input_features"][0]
        return np.ascontiguousarray(feats[:, : samples.shape[0] // HOP_LENGTH], dtype=np.float32)


class FeatureCache:
    """Log-mel per cut on disk (float16 .npy), keyed by cut id, audio file (path, size, mtime),
    span and mel bins.

    The recipe trains many models on the same cuts; extraction costs ~20 ms per 3 s utterance.
    Writes are atomic (several DataLoader workers may fill the cache at once).
    """

    def __init__(self, directory: str | Path, num_mel_bins: int) -> None:
        self.directory = Path(directory) / f"whisper_logmel_{num_mel_bins}"

    def path(self, cut) -> Path:
        source = cut.recording.sources[0].source if cut.has_recording else ""
        # The file's size and mtime: a regenerated corpus at the same paths gets new entries.
        st = os.stat(source) if source and os.path.isfile(source) else None
        stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else ""
        key = f"{cut.id}|{source}|{stamp}|{cut.start:.4f}|{cut.duration:.4f}|{cut.sampling_rate}"
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
        return self.directory / digest[:2] / f"{digest}.npy"

    def get_or_compute(self, cut, compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.path(cut)
        if path.exists():
            return np.load(path).astype(np.float32)
        feats = compute()
        with atomic_output(path) as tmp:
            np.save(tmp, feats.astype(np.float16))
        return feats.astype(np.float16).astype(np.float32)  # same values as a later cache hit


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
    """Map-style dataset for lhotse samplers: a CutSet (one batch) -> Batch."""

    def __init__(self, num_mel_bins: int, feature_cache_dir: Optional[str] = None) -> None:
        self.extractor = LogMelExtractor(num_mel_bins)
        self.cache = FeatureCache(feature_cache_dir, num_mel_bins) if feature_cache_dir else None

    def features(self, cut) -> np.ndarray:
        compute = lambda: self.extractor(_cut_audio(cut))  # noqa: E731
        return self.cache.get_or_compute(cut, compute) if self.cache else compute()

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
        raise FileNotFoundError(f"no cut set {path}; run the preparation stage (python -m hdmole.data.prepare)")
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
    return torch.utils.data.DataLoader(AsrDataset(num_mel_bins, cfg.feature_cache_dir), sampler=sampler,
                                       batch_size=None, num_workers=workers, persistent_workers=False)
