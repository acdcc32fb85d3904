"""Batched transcription of test sets into `utt_id<TAB>text` files (plus ref and utt2accent).

Output per test set: <exp>/decode/<set>/{hyp,ref,utt2accent,routing.json}. Hypotheses are
written raw; scoring normalises reference and hypothesis with the same normaliser.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class DecodeConfig:
    """Decoding options (the `decode:` section). GENERATION_FIELDS go to
    `LLMASR.transcribe(batch, **kwargs)`; the rest drive hdmole.decode."""

    max_new_tokens: int = 64  # hard cap on answer tokens
    # Cap relative to the audio: at most this many answer tokens per second of speech
    # (0 disables); stops runaway repetition loops early (a hallucination guard).
    max_tokens_per_second: float = 8.0
    num_beams: int = 1  # 1 = greedy
    length_penalty: float = 1.0  # beam search: score / length**length_penalty
    # Repetition guard: a hypothesis whose tail is one n-gram (n <= repeat_max_ngram)
    # repeated max_repeats times ends there (0 disables).
    max_repeats: int = 4
    repeat_max_ngram: int = 4
    # Which weights to decode with: "best" (the run's export, best dev metric) or "last" (the
    # trainable weights of checkpoints/last.pt, the end of training, over the export).
    checkpoint: str = "best"
    # Test sets by cut-set name (data/cuts/<name>.jsonl.gz); empty = every test set of the corpus.
    test_sets: list[str] = field(default_factory=list)
    device: str = "auto"
    # Limit per set for quick checks (0 = all utterances), in whole batches: the batch that
    # reaches it is decoded in full.
    max_utterances: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"decode.checkpoint={self.checkpoint!r}: choose one of {CHECKPOINTS}")


CHECKPOINTS = ("best", "last")


GENERATION_FIELDS = ("num_beams", "max_new_tokens", "max_tokens_per_second", "max_repeats", "repeat_max_ngram",
                     "length_penalty")


def generation_kwargs(cfg: DecodeConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in GENERATION_FIELDS}


def transcribe_batches(transcribe: Callable[[Any], dict[str, str]], batches: Iterable[Any], total: int | None = None,
                       desc: str = "decode") -> dict[str, str]:
    """Run `transcribe(batch) -> {utt_id: text}` over batches; ids must be unique."""
    hyps: dict[str, str] = {}
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc=desc, mininterval=2.0, dynamic_ncols=True):
            out = transcribe(batch)
            missing = set(batch.ids) - set(out)
            if missing:
                raise RuntimeError(f"{desc}: transcribe returned no hypothesis for {sorted(missing)[:5]}")
            for utt in batch.ids:
                if utt in hyps:
                    raise RuntimeError(f"{desc}: utterance {utt!r} decoded twice (duplicate id in the test set)")
                hyps[utt] = out[utt]
    return hyps


def write_set(out_dir: Path, hyps: dict[str, str], refs: dict[str, str], accents: dict[str, str],
              routing: dict | None = None) -> None:
    from hdmole.score import write_keyed

    write_keyed(out_dir / "ref", refs)
    write_keyed(out_dir / "utt2accent", accents)
    if routing is not None:
        (out_dir / "routing.json").write_text(json.dumps(routing, ensure_ascii=False) + "\n", encoding="utf-8")
    write_keyed(out_dir / "hyp", hyps)  # last: its presence marks a finished set
