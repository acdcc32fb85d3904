"""DataConfig: every option of the data side (corpora, preparation filters, loader)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional

SAMPLERS = ("bucketing", "simple")
FEATURE_STORAGES = ("numpy_hdf5", "lilcom_chunky")
SYNTHETIC_SIZES = ("ci", "default", "large")


@dataclass
class DataConfig:
    # --- corpora -------------------------------------------------------------------------
    # Root holding KeSpeech/ and aishell/ (the synthetic generator writes both there).
    corpus_dir: str = "data/corpus"
    # Real corpus roots (db.sh); None = <corpus_dir>/KeSpeech and <corpus_dir>/aishell.
    kespeech_dir: Optional[str] = None
    aishell_dir: Optional[str] = None
    # lhotse manifests (recordings/supervisions) and the filtered cut sets + stats report.
    manifest_dir: str = "data/manifests"
    cuts_dir: str = "data/cuts"
    # Synthetic corpus (hdmole.data.synthetic, `hdmole.bin.prepare corpus`) used when no real corpus is given.
    synthetic: bool = True
    synthetic_size: str = "default"
    synthetic_seed: int = 0
    # Worker processes/threads for generation and lhotse preparation (2 cores on CI machines).
    num_jobs: int = 2

    # --- text and filters (preparation) --------------------------------------------------
    traditional_to_simplified: bool = False
    # Training cuts outside [min_duration, max_duration] seconds are dropped; dev/test cuts
    # only when shorter than min_duration or longer than encoder_max_duration.
    min_duration: float = 0.3
    max_duration: float = 20.0
    # The Whisper encoder sees at most 30 s: longer utterances are dropped from every split.
    encoder_max_duration: float = 30.0
    max_chars: int = 100
    # A bad utterance (missing/corrupt/empty/multi-channel/NaN audio, unknown accent label,
    # repeated id, wav path outside the corpus): False = stop with an error naming the file and
    # line; True = skip it and count it in the stats report. Non-UTF-8 listings and empty
    # parts are errors either way.
    skip_bad: bool = False
    # Speed perturbation of the training cuts (lhotse; ids get a "_sp<factor>" suffix).
    speed_perturb: bool = False
    speed_factors: List[float] = field(default_factory=lambda: [0.9, 1.1])

    # --- loading ---------------------------------------------------------------------------
    # "bucketing": lhotse DynamicBucketingSampler; "simple": SimpleCutSampler (tiny data).
    sampler: str = "bucketing"
    batch_duration: float = 120.0  # seconds of audio per batch (lhotse max_duration)
    max_batch_size: Optional[int] = None  # cap on utterances per batch (lhotse max_cuts)
    num_buckets: int = 10
    num_workers: int = 2
    # Whisper log-mel computed once in stage 1 and kept in lhotse's feature storage under
    # feature_dir (hdmole.data.features): "numpy_hdf5" (float16, the loader's own values),
    # "lilcom_chunky" (compressed to multiples of 2^lilcom_tick_power; smallest) or None
    # (computed on the fly by the loader: no disk, a few ms per utterance every epoch).
    feature_storage: Optional[str] = None
    feature_dir: str = "data/fbank"
    lilcom_tick_power: int = -8
    # Outputs of a frozen encoder (without SpecAugment) are computed once per cut set and
    # encoder and kept here (hdmole.model.encoder_cache); None = encode every batch. About
    # 50 kB per second of audio for the tiny encoder: leave None for KeSpeech-sized corpora.
    encoder_cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.synthetic and not (self.kespeech_dir and self.aishell_dir):
            raise ValueError("data.synthetic=false needs data.kespeech_dir and data.aishell_dir (the real "
                             f"corpus roots, see db.sh); got {self.kespeech_dir!r}, {self.aishell_dir!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"data.sampler={self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.feature_storage is not None and self.feature_storage not in FEATURE_STORAGES:
            raise ValueError(f"data.feature_storage={self.feature_storage!r}; choose one of "
                             f"{', '.join(FEATURE_STORAGES)} or null (on the fly)")
        if self.synthetic_size not in SYNTHETIC_SIZES:
            raise ValueError(f"data.synthetic_size={self.synthetic_size!r}; choose one of {', '.join(SYNTHETIC_SIZES)}")
        if not 0 <= self.min_duration < self.max_duration <= self.encoder_max_duration:
            raise ValueError("data: need 0 <= min_duration < max_duration <= encoder_max_duration, got "
                             f"{self.min_duration}, {self.max_duration}, {self.encoder_max_duration}")
        for name in ("max_chars", "num_jobs", "num_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_duration <= 0 or self.num_workers < 0:
            raise ValueError("data.batch_duration must be > 0 and data.num_workers >= 0")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"data.max_batch_size must be >= 1 or null, got {self.max_batch_size}")
        if any(f <= 0 for f in self.speed_factors):
            raise ValueError(f"data.speed_factors must be positive, got {self.speed_factors}")

    @property
    def kespeech_root(self) -> Path:
        return Path(self.kespeech_dir) if self.kespeech_dir else Path(self.corpus_dir) / "KeSpeech"

    @property
    def aishell_root(self) -> Path:
        return Path(self.aishell_dir) if self.aishell_dir else Path(self.corpus_dir) / "aishell"

    def cuts_path(self, corpus: str, split: str) -> Path:
        """data/cuts/<corpus>_<split>.jsonl.gz, e.g. cuts_path("kespeech", "test")."""
        return Path(self.cuts_dir) / f"{corpus}_{split}.jsonl.gz"

    def feature_cuts_path(self, corpus: str, split: str) -> Path:
        """The cut set runs read: <feature_dir>/<corpus>_<split>.jsonl.gz, the cuts with their
        stored features; with feature_storage None the plain cuts (features on the fly)."""
        if self.feature_storage is None:
            return self.cuts_path(corpus, split)
        return Path(self.feature_dir) / f"{corpus}_{split}.jsonl.gz"

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "DataConfig":
        """Strict construction from a plain mapping (a misspelt key fails with its name)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"{source}: unknown data option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)
