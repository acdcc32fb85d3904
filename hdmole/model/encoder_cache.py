"""Outputs of a frozen speech encoder, computed once per utterance and reused.

Adaptation trains only the projector's adapters: the encoder is frozen and, without
SpecAugment, gives every utterance the same output in every epoch, run and preset. On the
tiny model the encoder is a third of a training step. The cache computes the outputs of a cut
set once, in a fixed order (so the values do not depend on which run filled it), and keeps
them in memory and in one safetensors file per (encoder weights, cut set) on disk.

Memory and disk grow with the audio: about 50 frames/s x encoder width x dtype size, 50 kB
per second of speech for the tiny encoder in fp32 (fine for the synthetic corpora), 128 kB/s
for Whisper-large-v3 in bf16: KeSpeech's 1,542 h would need about 0.7 TB, so leave it off
there (data.encoder_cache_dir=null).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from hdmole.fileio import atomic_output

log = logging.getLogger(__name__)


def encoder_fingerprint(encoder: torch.nn.Module, *settings: object) -> str:
    """Digest of the encoder's weights (bytes, names, dtypes) and of `settings`."""
    digest = hashlib.sha1()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Digest of a cut-set file's content (its ids, audio paths, spans and texts)."""
    digest = hashlib.sha1(path.read_bytes())
    return digest.hexdigest()[:12]


class EncoderOutputCache:
    """utterance id -> (frames, dim) encoder output of that utterance alone (valid frames)."""

    def __init__(self, directory: str | Path | None, fingerprint: str) -> None:
        self.directory = Path(directory) / fingerprint if directory else None
        self.outputs: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def fill(self, cut_set: Path, batches: Iterable, encode) -> None:
        """Load the outputs of `cut_set` from disk, or compute them with `encode(batch) ->
        (enc, enc_lens)` over `batches` (the cut set in a fixed order) and store them."""
        path = None
        if self.directory is not None:
            path = self.directory / f"{cut_set.name.split('.')[0]}-{file_fingerprint(cut_set)}.safetensors"
            if path.is_file():
                self.outputs.update(load_file(str(path)))
                log.info("encoder outputs of %s: loaded from %s", cut_set, path)
                return
        computed: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for batch in batches:
                enc, lens = encode(batch)
                for i, utt in enumerate(batch.ids):
                    computed[utt] = enc[i, : int(lens[i])].detach().cpu().clone()
        self.outputs.update(computed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                save_file(computed, str(tmp))
            log.info("encoder outputs of %s: %d utterances computed, saved to %s (%.0f MB)", cut_set,
                     len(computed), path, os.path.getsize(path) / 2**20)

    def lookup(self, ids: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The padded batch (B, T, D) and valid lengths (B,), or None when any id is missing."""
        rows = [self.outputs.get(utt) for utt in ids]
        if any(r is None for r in rows):
            self.misses += 1
            return None
        self.hits += 1
        lens = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
        out = rows[0].new_zeros(len(rows), int(lens.max()), rows[0].shape[1])
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out.to(device), lens.to(device)
