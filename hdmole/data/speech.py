"""Speech rendering for the synthetic corpus: espeak-ng (via espeakng-loader) + channel effects.

espeak-ng 1.52's `cmn` voice reads numbered pinyin ("zhong1 guo2"), so accent rules written on
pinyin become audible. The library is driven through ctypes; one engine per process.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import numpy as np

SAMPLE_RATE = 16000
_ESPEAK_RATE = 22050
# espeak_PARAMETER values (speak_lib.h)
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1

# Voice variants of espeak-ng that work with `cmn`; a speaker is a variant + pitch/range/rate.
VOICE_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
)


@dataclass(frozen=True)
class Voice:
    variant: str
    pitch: int  # espeak 0-100 (50 = default)
    pitch_range: int  # espeak 0-100
    rate: int  # words per minute (espeak default 175)


class Espeak:
    """In-process espeak-ng engine (synchronous mode, audio collected through a callback)."""

    _instance: "Espeak | None" = None

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate != _ESPEAK_RATE:
            raise RuntimeError(f"espeak-ng initialisation failed or unexpected rate ({rate})")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def collect(wav, num_samples, _events):  # noqa: ANN001 - ctypes callback
            if num_samples > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
            return 0

        self._callback = callback_type(collect)  # keep a reference: espeak calls it later
        self._lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> "Espeak":
        """The process-wide engine (espeak-ng keeps global state)."""
        if cls._instance is None:
            cls._instance = Espeak()
        return cls._instance

    @classmethod
    def fresh(cls) -> "Espeak":
        """An engine in its initial state. espeak-ng keeps static synthesis state across
        utterances (the same text twice gives different samples after different predecessors),
        so the corpus generator reloads the library (a few ms: the cmn dictionary is reread)
        at the start of each fixed block of utterances and seeds the random generators before
        each utterance: output then depends only on the plan, whatever the number of workers
        (tests/test_data_pipeline.py checks byte identity)."""
        import _ctypes

        if cls._instance is not None:
            cls._instance._lib.espeak_Terminate()
            _ctypes.dlclose(cls._instance._lib._handle)
            cls._instance = None
        return cls.get()

    def seed(self, rand_seed: int) -> None:
        """Seed espeak-ng's own generator and libc's rand() (used by the klatt voices)."""
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(rand_seed))
        ctypes.CDLL(None).srand(ctypes.c_uint(rand_seed))

    def synthesize(self, pinyin: str, voice: Voice) -> np.ndarray:
        """Numbered pinyin -> float32 mono audio at 16 kHz in [-1, 1]."""
        from scipy.signal import resample_poly

        if self._lib.espeak_SetVoiceByName(f"cmn+{voice.variant}".encode()) != 0:
            raise ValueError(f"espeak-ng has no voice cmn+{voice.variant}")
        self._lib.espeak_SetParameter(_RATE, voice.rate, 0)
        self._lib.espeak_SetParameter(_PITCH, voice.pitch, 0)
        self._lib.espeak_SetParameter(_RANGE, voice.pitch_range, 0)
        self._lib.espeak_SetParameter(_VOLUME, 100, 0)
        self._chunks = []
        data = pinyin.encode("utf-8")
        status = self._lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {pinyin!r} (status {status})")
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        return resample_poly(audio, 320, 441).astype(np.float32)  # 22050 -> 16000 Hz

    def phonemes(self, text: str, variant: str = "m1") -> str:
        """IPA phonemes espeak-ng would say (used by tests: English fallback shows up as "(en)")."""
        self._lib.espeak_SetVoiceByName(f"cmn+{variant}".encode())
        self._lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        pointer = ctypes.pointer(ctypes.c_char_p(text.encode("utf-8")))
        parts = []
        while pointer.contents.value:
            parts.append(self._lib.espeak_TextToPhonemes(pointer, _CHARS_UTF8, 0x02).decode("utf-8"))
        return " ".join(parts)


def _board(*plugins) -> Callable[[np.ndarray], np.ndarray]:
    def apply(audio: np.ndarray) -> np.ndarray:
        import pedalboard

        return pedalboard.Pedalboard([make() for make in plugins])(audio, SAMPLE_RATE)

    return apply


def _p(name: str, **kwargs):
    """Deferred pedalboard plugin constructor (pedalboard is imported in the worker only)."""

    def make():
        import pedalboard

        return getattr(pedalboard, name)(**kwargs)

    return make


# Channel = microphone / room / transmission chain. Registry: name -> effect.
CHANNELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "clean": lambda audio: audio,
    "studio": _board(_p("Reverb", room_size=0.1, wet_level=0.05, dry_level=1.0)),
    "bright_mic": _board(_p("HighShelfFilter", cutoff_frequency_hz=3000, gain_db=6.0)),
    "muffled": _board(_p("LowpassFilter", cutoff_frequency_hz=2500)),
    "far_field": _board(_p("Reverb", room_size=0.6, wet_level=0.25, dry_level=0.8)),
    "boomy": _board(_p("LowShelfFilter", cutoff_frequency_hz=250, gain_db=8.0),
                    _p("Reverb", room_size=0.2, wet_level=0.1, dry_level=1.0)),
    "telephone": _board(_p("HighpassFilter", cutoff_frequency_hz=300), _p("LowpassFilter", cutoff_frequency_hz=3400),
                        _p("Compressor", threshold_db=-20, ratio=4)),
    "radio": _board(_p("HighpassFilter", cutoff_frequency_hz=200), _p("LowpassFilter", cutoff_frequency_hz=5000),
                    _p("Distortion", drive_db=8)),
    "hall": _board(_p("Reverb", room_size=0.85, wet_level=0.3, dry_level=0.8, damping=0.3)),
    "narrowband": _board(_p("HighpassFilter", cutoff_frequency_hz=200), _p("LowpassFilter", cutoff_frequency_hz=3000)),
}


def apply_channel(audio: np.ndarray, channel: str, snr_db: float, gain_dbfs: float, noise_seed: int) -> np.ndarray:
    """Channel effect, additive white noise at `snr_db`, then peak level `gain_dbfs` (deterministic)."""
    out = np.asarray(CHANNELS[channel](audio.astype(np.float32)), dtype=np.float64).reshape(-1)
    power = float(np.mean(out**2)) + 1e-12
    noise = np.random.default_rng(noise_seed).standard_normal(out.shape[0])
    out = out + noise * np.sqrt(power / 10 ** (snr_db / 10))
    out *= 10 ** (gain_dbfs / 20) / (np.max(np.abs(out)) + 1e-9)
    return out.astype(np.float32)
