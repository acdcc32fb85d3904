"""Whisper log-mel as a lhotse feature extractor, computed once per cut set (stage 1) and kept in
lhotse's feature storage, as icefall's recipes keep their fbank.

`data.feature_storage` picks lhotse's writer:
  - "numpy_hdf5": float16 arrays in one HDF5 file per job and chunk; exactly the values the
    training/decoding loader computes (float16-rounded), so results do not move.
  - "lilcom_chunky": lilcom-compressed chunked archives (lossy: values are multiples of
    2^`data.lilcom_tick_power`); the smallest on disk, for KeSpeech-sized corpora.
  - null: no stored features; the loader computes them on the fly (corpora that do not fit the disk).

Frame counts: Whisper gives num_samples // 160 frames; lhotse's manifests declare
round(duration / 0.01) (one more for half the lengths). The stored matrix has lhotse's count (the
last frame repeated, lhotse's own convention for off-by-one frames) and the loader cuts it back.
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
from lhotse import CutSet
from lhotse.features.base import FeatureExtractor, register_extractor
from lhotse.features.io import NumpyHdf5Writer
from lhotse.utils import compute_num_frames
from tqdm.auto import tqdm

from hdmole.data.config import DataConfig
from hdmole.fileio import atomic_output

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # 100 frames per second
# Cuts per storage chunk: bounds the memory of a KeSpeech-sized split (the cut manifests of a
# chunk are held until written) and the number of storage files (num_jobs per chunk).
CHUNK_CUTS = 20000


def whisper_frames(num_samples: int) -> int:
    """Frames of Whisper's log-mel (hop 160, the last centred frame dropped)."""
    return num_samples // HOP_LENGTH


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
        return np.ascontiguousarray(feats[:, : whisper_frames(samples.shape[0])], dtype=np.float32)


@dataclass
class WhisperLogMelConfig:
    num_mel_bins: int = 80


@register_extractor
class WhisperLogMel(FeatureExtractor):
    """`LogMelExtractor` for lhotse: (frames, mels) with lhotse's frame count."""

    name = "whisper-logmel"
    config_type = WhisperLogMelConfig

    def __init__(self, config: WhisperLogMelConfig | None = None) -> None:
        super().__init__(config)
        self._extractor = None  # built on first use: transformers' extractor stays out of the pickle

    def __getstate__(self) -> dict:
        return {"config": self.config, "_extractor": None}

    @property
    def frame_shift(self) -> float:
        return HOP_LENGTH / SAMPLE_RATE

    def feature_dim(self, sampling_rate: int) -> int:
        return self.config.num_mel_bins

    def extract(self, samples: np.ndarray, sampling_rate: int) -> np.ndarray:
        if sampling_rate != SAMPLE_RATE:
            raise ValueError(f"whisper-logmel needs {SAMPLE_RATE} Hz audio, got {sampling_rate} Hz")
        if self._extractor is None:
            self._extractor = LogMelExtractor(self.config.num_mel_bins)
        samples = samples[0] if samples.ndim == 2 else samples
        feats = self._extractor(samples).T
        declared = compute_num_frames(samples.shape[0] / sampling_rate, self.frame_shift, sampling_rate)
        if declared > feats.shape[0]:
            feats = np.concatenate([feats, np.repeat(feats[-1:], declared - feats.shape[0], axis=0)])
        return feats


class Float16Hdf5Writer(NumpyHdf5Writer):
    """lhotse's HDF5 writer storing float16 (half the bytes; read by lhotse's own reader)."""

    def write(self, key: str, value: np.ndarray) -> str:
        return super().write(key, value.astype(np.float16))


def storage_writer(cfg: DataConfig):
    """The lhotse writer type for `data.feature_storage`."""
    from lhotse import LilcomChunkyWriter

    if cfg.feature_storage == "numpy_hdf5":
        return Float16Hdf5Writer
    return partial(LilcomChunkyWriter, tick_power=cfg.lilcom_tick_power)


def load_cut_features(cut, num_mel_bins: int) -> np.ndarray:
    """A cut's stored features as Whisper gives them: (mels, num_samples // 160) float32."""
    if not cut.has_features:
        raise ValueError(f"cut {cut.id} has no stored features; run stage 1's features step "
                         "(python -m hdmole.bin.prepare features) or set data.feature_storage=null")
    feats = cut.load_features()
    if feats.shape[1] != num_mel_bins:
        raise ValueError(f"cut {cut.id}: stored features have {feats.shape[1]} mel bins, the model takes "
                         f"{num_mel_bins}: recompute them (stage 1) for this model")
    return np.ascontiguousarray(feats[: whisper_frames(cut.num_samples)].T, dtype=np.float32)


def _chunks(cuts, size: int) -> Iterator[CutSet]:
    batch = []
    for cut in cuts:
        batch.append(cut)
        if len(batch) == size:
            yield CutSet.from_cuts(batch)
            batch = []
    if batch:
        yield CutSet.from_cuts(batch)


def storage_root(out_path: Path) -> Path:
    """Where the features of the cut manifest `out_path` are stored: <dir>/<corpus>_<split>/."""
    return out_path.parent / out_path.name.split(".")[0]


def compute_features(cfg: DataConfig, cuts_path: Path, out_path: Path, num_mel_bins: int, pool=None) -> dict:
    """Stored features for every cut of `cuts_path`; the cuts with features go to `out_path`.

    Chunks of CHUNK_CUTS cuts, each split over data.num_jobs processes of `pool` (lhotse's
    compute_and_store_features; None: one job, here): storage under
    <out_path without suffix>/<chunk>/feats-<job>.
    Returns counts for the stats report. lhotse drops a cut whose audio fails to load: stage 1
    has checked every file, so a drop here is an error naming the cuts.
    """
    from lhotse import load_manifest_lazy

    storage = storage_root(out_path)
    shutil.rmtree(storage, ignore_errors=True)  # no chunk of an earlier, longer cut set survives
    storage.mkdir(parents=True)
    extractor = WhisperLogMel(WhisperLogMelConfig(num_mel_bins))
    writer = storage_writer(cfg)
    counts = {"cuts": 0, "frames": 0, "hours": 0.0}
    cuts = load_manifest_lazy(cuts_path)
    with atomic_output(out_path) as tmp, CutSet.open_writer(tmp) as out, \
            tqdm(desc=f"features {cuts_path.name}", unit="cut") as progress:
        for index, chunk in enumerate(_chunks(cuts, CHUNK_CUTS)):
            done = chunk.compute_and_store_features(extractor, storage / f"{index:05d}",
                                                    num_jobs=cfg.num_jobs if pool else 1, storage_type=writer,
                                                    executor=pool, progress_bar=False)
            lost = sorted(set(chunk.ids) - set(done.ids))
            if lost:
                raise RuntimeError(f"{cuts_path}: lhotse could not compute features for {len(lost)} cut(s), "
                                   f"e.g. {', '.join(lost[:5])} (audio changed since stage 1?)")
            with_features = {cut.id: cut for cut in done}
            for cut_id in chunk.ids:  # in the input's order: samplers read cuts in file order
                cut = with_features[cut_id]
                out.write(cut)
                counts["frames"] += cut.num_frames
                counts["hours"] += cut.duration / 3600
            counts["cuts"] += len(chunk)
            progress.update(len(chunk))
    return counts


def compute_all_features(cfg: DataConfig, num_mel_bins: int) -> dict:
    """Stage 1's features step: every prepared cut set, with a report (cuts, hours, bytes, files,
    seconds per cut set) in <feature_dir>/stats.json."""
    from hdmole.data.prepare import SPLITS

    if cfg.feature_storage is None:
        raise ValueError("data.feature_storage is null (features on the fly): nothing to compute")
    report = {"storage": cfg.feature_storage, "num_mel_bins": num_mel_bins, "cut_sets": {}}
    if cfg.feature_storage == "lilcom_chunky":
        report["lilcom_tick_power"] = cfg.lilcom_tick_power
    with job_pool(cfg.num_jobs) as pool:
        for corpus, splits in SPLITS.items():
            for split in splits:
                out_path = cfg.feature_cuts_path(corpus, split)
                start = time.time()
                counts = compute_features(cfg, cfg.cuts_path(corpus, split), out_path, num_mel_bins, pool)
                files = [f for f in storage_root(out_path).rglob("*") if f.is_file()]
                counts.update(seconds=round(time.time() - start, 1), files=len(files),
                              bytes=sum(f.stat().st_size for f in files))
                report["cut_sets"][f"{corpus}_{split}"] = counts
                log.info("features %s_%s: %d cuts, %.2f h, %.1f MB in %d files, %.0f s", corpus, split,
                         counts["cuts"], counts["hours"], counts["bytes"] / 1e6, counts["files"], counts["seconds"])
    with atomic_output(Path(cfg.feature_dir) / "stats.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def job_pool(num_jobs: int):
    """data.num_jobs spawned processes of one torch thread each (the jobs are the cores; more
    threads oversubscribe them), started once for every cut set; None for one job (lhotse then
    extracts in this process). Meanwhile this process only waits: one thread (lhotse warns otherwise)."""
    import torch

    if num_jobs == 1:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(num_jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
