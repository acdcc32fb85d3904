"""Synthetic subdialects: systematic rewrite rules on numbered pinyin, one rule set per KeSpeech label.

Each rule set is inspired by documented features of the real subdialect group (initial mergers,
nasal-coda mergers, r- and hu-/f- shifts, tone-category remaps taken from the contours of a
representative city) and is applied deterministically to every syllable, so an accent is a
learnable, systematic mapping. Several rules deliberately CONFLICT between accents
(Southwestern zh->z vs Northeastern z->zh, Southwestern n->l vs Jiang-Huai l->n, Southwestern
-ng->-n vs Lan-Yin -n->-ng, Southwestern hu->f vs Lan-Yin f->hu, different tone permutations), so
that one unconditioned adapter cannot undo all accents at once. The table is documented in
docs/data.md; `rule_table_markdown()` renders it from this file.

A syllable is `base + tone` ("zhong1"; tone 5 = neutral; "v" writes u-umlaut as in pypinyin).
A rewrite whose result is not a Mandarin syllable is not applied (the syllable stays as it was).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from hdmole.data.accents import ACCENTS


@lru_cache(maxsize=1)
def valid_syllables() -> frozenset[str]:
    """Every toneless Mandarin syllable pypinyin knows (about 420), in its "v for u-umlaut" spelling."""
    from pypinyin.constants import PINYIN_DICT
    from pypinyin.contrib.tone_convert import to_normal

    return frozenset(
        to_normal(p) for readings in PINYIN_DICT.values() for p in readings.split(",") if to_normal(p).isascii()
    )


def split_tone(syllable: str) -> tuple[str, int]:
    """"zhong1" -> ("zhong", 1); a syllable without digit is neutral (5)."""
    if syllable and syllable[-1].isdigit():
        return syllable[:-1], int(syllable[-1])
    return syllable, 5


@dataclass(frozen=True)
class Rewrite:
    """One regex rewrite of a toneless syllable (anchored by the pattern itself)."""

    pattern: str
    replacement: str
    feature: str  # the real-dialect feature it imitates (documentation)

    def apply(self, base: str) -> str:
        return re.sub(self.pattern, self.replacement, base)


def _initial_map(mapping: dict[str, str], feature: str) -> list[Rewrite]:
    # Longest initials first so that "zh" is not read as "z" + "h".
    return [Rewrite(f"^{src}(?!h)" if len(src) == 1 and src in "zcs" else f"^{src}", dst, feature)
            for src, dst in sorted(mapping.items(), key=lambda kv: -len(kv[0]))]


@dataclass(frozen=True)
class AccentRules:
    """Pronunciation rules of one synthetic subdialect."""

    rewrites: tuple[Rewrite, ...] = ()
    tones: dict[int, int] = field(default_factory=dict)  # tone category remap (1-5); missing = unchanged
    tone_feature: str = ""
    # Beijing-style neutral tone (qingsheng) on the last syllable of multi-syllable words.
    neutral_word_final: bool = False

    def syllable(self, syllable: str, word_final_in_multisyllable: bool = False) -> str:
        base, tone = split_tone(syllable)
        new = base
        for rw in self.rewrites:
            candidate = rw.apply(new)
            if candidate in valid_syllables():
                new = candidate
        tone = self.tones.get(tone, tone)
        if self.neutral_word_final and word_final_in_multisyllable:
            tone = 5
        return f"{new}{tone}"

    def words(self, words: list[list[str]]) -> list[list[str]]:
        """Apply to a sentence given as words of numbered-pinyin syllables."""
        return [
            [self.syllable(s, len(w) > 1 and i == len(w) - 1) for i, s in enumerate(w)]
            for w in words
        ]


_RETROFLEX_TO_DENTAL = _initial_map({"zh": "z", "ch": "c", "sh": "s"}, "zh/ch/sh merge into z/c/s")
_HU_TO_F = [
    Rewrite(r"^hu$", "fu", "hu- read as f-"),
    Rewrite(r"^hu(a|an|ang)$", r"f\1", "hu- read as f-"),
    Rewrite(r"^hui$", "fei", "hu- read as f-"),
    Rewrite(r"^huo$", "fo", "hu- read as f-"),
]
_F_TO_HU = [
    Rewrite(r"^fu$", "hu", "f- read as hu-"),
    Rewrite(r"^f(a|an|ang)$", r"hu\1", "f- read as hu-"),
    Rewrite(r"^fei$", "hui", "f- read as hu-"),
    Rewrite(r"^fen$", "hun", "f- read as hu-"),
    Rewrite(r"^feng$", "hong", "f- read as hu-"),
    Rewrite(r"^fo$", "huo", "f- read as hu-"),
]

ACCENT_RULES: dict[str, AccentRules] = {
    "Mandarin": AccentRules(),
    # Beijing: standard segments and tones; frequent neutral tone (qingsheng) in words.
    "Beijing": AccentRules(neutral_word_final=True, tone_feature="neutral tone on word-final syllables"),
    # Southwestern (Chengdu 55/21/53/213): flat-tongue initials, n/l merger towards l,
    # -ng codas fronted, hu->f, tones permuted by contour.
    "Southwestern": AccentRules(
        rewrites=(
            *_RETROFLEX_TO_DENTAL,
            Rewrite(r"^n", "l", "n/l merge into l"),
            Rewrite(r"(i|e)ng$", r"\1n", "-ing/-eng merge into -in/-en"),
            *_HU_TO_F,
        ),
        tones={2: 3, 3: 4, 4: 2},
        tone_feature="T2 21->3, T3 53->4, T4 213->2",
    ),
    # Zhongyuan (Zhengzhou 24/42/55/31; Guanzhong shu->f): n- on zero-initial open syllables.
    "Zhongyuan": AccentRules(
        rewrites=(
            Rewrite(r"^(a|ai|an|ang|ao|e|en|ou)$", r"n\1", "zero initial gets n- (ng- in the dialect)"),
            Rewrite(r"^shu$", "fu", "Guanzhong shu- read as f-"),
            Rewrite(r"^shui$", "fei", "Guanzhong shu- read as f-"),
            Rewrite(r"^shuo$", "fo", "Guanzhong shu- read as f-"),
            Rewrite(r"^shuang$", "fang", "Guanzhong shu- read as f-"),
        ),
        tones={1: 2, 2: 4, 3: 1, 4: 3},
        tone_feature="T1 24->2, T2 42->4, T3 55->1, T4 31->3",
    ),
    # Northeastern (Shenyang 33/24/213/53): r- read as y- (ren->yin), hypercorrect z/c/s -> zh/ch/sh, low T1.
    "Northeastern": AccentRules(
        rewrites=(
            Rewrite(r"^ren$", "yin", "r- read as y-"),
            Rewrite(r"^r", "y", "r- read as y-"),
            *_initial_map({"z": "zh", "c": "ch", "s": "sh"}, "z/c/s hypercorrected to zh/ch/sh"),
        ),
        tones={1: 3},
        tone_feature="T1 33 (low level) read as the low tone 3",
    ),
    # Lan-Yin (Lanzhou 31/53/442/13): -n codas backed to -ng, f->hu, tones permuted.
    "Lan-Yin": AccentRules(
        rewrites=(
            Rewrite(r"(a|e|i)n$", r"\1ng", "-an/-en/-in merge into -ang/-eng/-ing"),
            *_F_TO_HU,
        ),
        tones={1: 3, 2: 4, 3: 1, 4: 2},
        tone_feature="T1 31->3, T2 53->4, T3 442->1, T4 13->2",
    ),
    # Jiang-Huai (Nanjing 31/13/22/44): n/l merger towards n, -ng fronted, tones permuted.
    "Jiang-Huai": AccentRules(
        rewrites=(
            Rewrite(r"^l", "n", "n/l merge into n"),
            Rewrite(r"(i|e)ng$", r"\1n", "-ing/-eng merge into -in/-en"),
        ),
        tones={1: 4, 2: 3, 3: 2, 4: 1},
        tone_feature="T1 31->4, T2 13->3, T3 22->2, T4 44->1",
    ),
    # Ji-Lu (Jinan 213/42/55/21): r->l, n- on zero-initial syllables, low T4 read as neutral.
    "Ji-Lu": AccentRules(
        rewrites=(
            Rewrite(r"^r", "l", "r- read as l-"),
            Rewrite(r"^(a|ai|an|ao|e|ou)$", r"n\1", "zero initial gets n-"),
        ),
        tones={1: 3, 2: 4, 3: 1, 4: 5},
        tone_feature="T1 213->3, T2 42->4, T3 55->1, T4 21->5",
    ),
    # Jiao-Liao (Qingdao 213/42/55/42, only three tones): r->y, ji/qi/xi -> zi/ci/si (jian/tuan).
    "Jiao-Liao": AccentRules(
        rewrites=(
            Rewrite(r"^ren$", "yin", "r- read as y-"),
            Rewrite(r"^r", "y", "r- read as y-"),
            Rewrite(r"^j(?=i$)", "z", "jian/tuan distinction: ji/qi/xi read zi/ci/si"),
            Rewrite(r"^q(?=i$)", "c", "jian/tuan distinction: ji/qi/xi read zi/ci/si"),
            Rewrite(r"^x(?=i$)", "s", "jian/tuan distinction: ji/qi/xi read zi/ci/si"),
        ),
        tones={1: 3, 2: 4, 3: 1},
        tone_feature="T1 213->3, T2 42->4, T3 55->1, T4 42 (merges with T2)",
    ),
}
assert tuple(ACCENT_RULES) == ACCENTS, "one rule set per KeSpeech label, in ACCENTS order"


def rule_table_markdown() -> str:
    """The rule table for docs/data.md and the corpus README."""
    lines = ["| accent | segment rules | tones |", "|---|---|---|"]
    for accent, rules in ACCENT_RULES.items():
        features = list(dict.fromkeys(rw.feature for rw in rules.rewrites)) or ["standard"]
        lines.append(f"| {accent} | {'; '.join(features)} | {rules.tone_feature or 'standard'} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class AccentStyle:
    """Accent-typical speaking style and recording channel (on top of each speaker's own voice)."""

    rate_scale: float  # speaking rate relative to the speaker's
    pitch_offset: int  # added to the speaker's espeak pitch (0-100 scale)
    range_scale: float  # pitch range (intonation liveliness) relative to the speaker's
    channel: str  # key of hdmole.data.speech.CHANNELS
    snr_db: float  # mean signal-to-noise ratio of additive noise


# The source domain (AISHELL layout): clean close-talk recordings.
SOURCE_STYLE = AccentStyle(1.0, 0, 1.0, "clean", 40.0)
ACCENT_STYLES: dict[str, AccentStyle] = {
    "Mandarin": AccentStyle(1.0, 0, 1.0, "studio", 30.0),
    "Beijing": AccentStyle(1.2, 0, 0.8, "bright_mic", 30.0),
    "Southwestern": AccentStyle(0.9, 5, 1.3, "muffled", 25.0),
    "Zhongyuan": AccentStyle(1.0, -5, 1.1, "far_field", 28.0),
    "Northeastern": AccentStyle(1.05, -10, 0.9, "boomy", 28.0),
    "Lan-Yin": AccentStyle(0.95, 0, 1.2, "telephone", 25.0),
    "Jiang-Huai": AccentStyle(1.1, 5, 1.0, "radio", 28.0),
    "Ji-Lu": AccentStyle(0.9, -5, 1.2, "hall", 30.0),
    "Jiao-Liao": AccentStyle(1.0, 8, 0.9, "narrowband", 22.0),
}
assert tuple(ACCENT_STYLES) == ACCENTS


def style_table_markdown() -> str:
    lines = ["| domain | rate | pitch offset | pitch range | channel | SNR dB |", "|---|---|---|---|---|---|"]
    for name, s in {"source (AISHELL)": SOURCE_STYLE, **ACCENT_STYLES}.items():
        lines.append(f"| {name} | x{s.rate_scale} | {s.pitch_offset:+d} | x{s.range_scale} | {s.channel} | {s.snr_db:g} |")
    return "\n".join(lines)
