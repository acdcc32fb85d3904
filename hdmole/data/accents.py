"""Accent (KeSpeech subdialect) labels: the one list every part of the project indexes.

KeSpeech stores the label in `SupervisionSegment.language` (lhotse's `prepare_kespeech`).
AISHELL (the source domain) is standard Mandarin; lhotse labels it "Chinese".
"""
from __future__ import annotations

ACCENTS: tuple[str, ...] = (
    "Mandarin",
    "Beijing",
    "Southwestern",
    "Zhongyuan",
    "Northeastern",
    "Lan-Yin",
    "Jiang-Huai",
    "Ji-Lu",
    "Jiao-Liao",
)
SOURCE_ACCENT = "Mandarin"
# lhotse's AISHELL recipe writes language="Chinese": it is the source (standard) domain.
LABEL_ALIASES = {"Chinese": SOURCE_ACCENT}


def accent_id(label: str) -> int:
    """Index of a KeSpeech label in ACCENTS; raises with the known labels otherwise."""
    label = LABEL_ALIASES.get(label, label)
    try:
        return ACCENTS.index(label)
    except ValueError:
        raise ValueError(f"unknown accent label {label!r}; known: {', '.join(ACCENTS)}") from None
