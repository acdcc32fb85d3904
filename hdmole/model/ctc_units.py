"""Output units of the encoder's auxiliary CTC head (a small registry, `ModelConfig.ctc_units`).

- `tokens`: the LLM tokenizer's vocabulary, blank = the pad token. With the project's char-level
  tiny tokenizer this is character CTC.
- `pinyin`: Mandarin initials, finals and tones (66 units, blank = 0), from the text via
  pypinyin. Far easier to learn from little audio than ~2,000 characters (docs/base_model.md, preliminary measurements: 31%
  phone error vs 62% character error in the same 10 CPU minutes), so it suits encoder
  pre-training of the tiny base model. Characters without a reading (punctuation, Latin) are
  skipped.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Protocol

from transformers import PreTrainedTokenizerBase

TONES = ("1", "2", "3", "4", "5")


class CTCUnits(Protocol):
    size: int
    blank: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def reference(self, text: str) -> str: ...


class TokenUnits:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, blank: int) -> None:
        self.tokenizer, self.size, self.blank = tokenizer, vocab_size, blank

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def reference(self, text: str) -> str:
        return text


def _split_syllable(syllable: str) -> tuple[str, str]:
    from pypinyin.contrib.tone_convert import to_finals, to_initials

    initial, final = to_initials(syllable), to_finals(syllable)
    return (initial, final) if final else ("", syllable)  # "m", "ng", "hm": one unit


@lru_cache(maxsize=1)
def pinyin_inventory() -> tuple[str, ...]:
    """Blank, then every initial and final of every syllable pypinyin knows, then the tones."""
    from pypinyin.constants import PINYIN_DICT
    from pypinyin.contrib.tone_convert import to_normal

    syllables = {to_normal(p) for readings in PINYIN_DICT.values() for p in readings.split(",")}
    parts = set()
    for s in syllables:
        if s.isascii() and s.isalpha():
            parts.update(p for p in _split_syllable(s) if p)
    return ("<blank>", *sorted(parts), *TONES)


class PinyinUnits:
    def __init__(self) -> None:
        self.units = pinyin_inventory()
        self.index = {u: i for i, u in enumerate(self.units)}
        self.size, self.blank = len(self.units), 0

    def syllables(self, text: str) -> list[str]:
        from pypinyin import Style, lazy_pinyin

        return [s for s in lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True, errors="ignore")
                if s and s[-1] in TONES and s[:-1].isascii() and s[:-1].isalpha()]

    def encode(self, text: str) -> list[int]:
        ids = []
        for syllable in self.syllables(text):
            initial, final = _split_syllable(syllable[:-1])
            ids += [self.index[u] for u in (initial, final, syllable[-1]) if u]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Numbered-pinyin syllables separated by spaces ("jin1 tian1"); a tone closes a syllable."""
        out, current = [], ""
        for i in ids:
            unit = self.units[i]
            if unit in TONES:
                if current:
                    out.append(current + unit)
                current = ""
            elif unit != "<blank>":
                current += unit
        return " ".join(out + ([current] if current else []))

    def reference(self, text: str) -> str:
        """A transcript in the form `decode` returns (phonetic spelling, "wo3" -> "uo3"), to
        score CTC output like with like."""
        return self.decode(self.encode(text))


CTC_UNITS: dict[str, Callable[[PreTrainedTokenizerBase, int, int], CTCUnits]] = {
    "tokens": lambda tokenizer, vocab_size, pad_id: TokenUnits(tokenizer, vocab_size, pad_id),
    "pinyin": lambda tokenizer, vocab_size, pad_id: PinyinUnits(),
}


def make_ctc_units(name: str, tokenizer: PreTrainedTokenizerBase, vocab_size: int, pad_id: int) -> CTCUnits:
    if name not in CTC_UNITS:
        raise ValueError(f"model.ctc_units {name!r} unknown; use one of {sorted(CTC_UNITS)}")
    return CTC_UNITS[name](tokenizer, vocab_size, pad_id)
