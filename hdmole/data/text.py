"""The one text normaliser, shared by data preparation and scoring.

References and hypotheses must be normalised identically (the usual Mandarin CER convention:
otherwise the CER counts punctuation, width and spacing), so `hdmole.score` imports
`normalize_text` from here instead of writing its own.
"""
from __future__ import annotations

import re
import unicodedata

# KeSpeech marks non-speech events and punctuation with tags such as <SPOKEN_NOISE>, <SIL>,
# <PERIOD>; none of them is spoken content.
_TAG = re.compile(r"<[A-Z_]+>")
# Supported output characters: CJK unified ideographs (+ extension A), upper-case Latin, digits.
_SUPPORTED = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbfA-Z0-9]")


def _is_dropped(ch: str) -> bool:
    """Punctuation (P*), symbols (S*), separators/whitespace (Z*) and control characters (C*)."""
    return ch.isspace() or unicodedata.category(ch)[0] in "PSZC"


def normalize_text(text: str, traditional_to_simplified: bool = False) -> str:
    """Normalise a transcript for training and CER scoring.

    - KeSpeech tags (`<SPOKEN_NOISE>`, `<SIL>`, `<PERIOD>`, ...) removed;
    - full-width forms folded to half width (NFKC: "ＡＢ１" -> "AB1");
    - punctuation and symbols of either width removed, whitespace removed;
    - Latin upper-cased;
    - optionally traditional -> simplified Chinese (zhconv, "zh-hans").
    """
    text = _TAG.sub("", text)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if not _is_dropped(ch)).upper()
    if traditional_to_simplified:
        import zhconv  # imported lazily: only needed for corpora with traditional characters

        text = zhconv.convert(text, "zh-hans")
    return text


def unsupported_chars(normalized: str) -> list[str]:
    """Characters of an already normalised text that the model's output alphabet lacks (sorted)."""
    return sorted({ch for ch in normalized if not _SUPPORTED.fullmatch(ch)})
