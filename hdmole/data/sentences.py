"""Text of the synthetic corpus: a controlled character inventory and sentences written only with it.

Why: a tiny model trained from scratch cannot learn ~1,800 characters seen ~14 times each
(docs/base_model.md, the preliminary measurements); it can learn a few hundred characters
seen hundreds of times.
So the inventory is the most frequent characters of the HSK sentences, at most
`max_homophones` characters per toned syllable (fewer acoustically identical characters), and
sentences are (a) HSK sentences written entirely in the inventory and (b) pseudo-sentences
from a small template grammar: closed word classes listed here, open classes (nouns, verbs,
adjectives, time words) from jieba's dictionary restricted to the inventory.
HSK sentence text: hsk-sentences-audio, CC-BY-SA-4.0 (credited in the corpus README).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_HANZI = re.compile(r"[\u4e00-\u9fff]")

Word = tuple[str, tuple[str, ...]]  # (hanzi, numbered pinyin syllables)
Sentence = tuple[Word, ...]

# Closed word classes of the template grammar (kept only where every character is in the inventory).
CLOSED_CLASSES: dict[str, tuple[str, ...]] = {
    "R": ("我", "你", "他", "她", "我们", "你们", "他们", "大家"),
    "DEG": ("很", "太", "真", "非常", "比较", "最", "特别"),
    "ADV": ("也", "都", "还", "就", "常常", "已经", "一起", "马上", "再", "又", "经常", "不"),
    "MOD": ("想", "要", "会", "能", "可以", "应该"),
    "ZAI": ("在",),
    "CONJ": ("和", "跟"),
    "NUM": ("一", "两", "三", "四", "五", "六", "七", "八", "九", "十", "几"),
    "CL": ("个", "本", "张", "件", "杯", "只", "条", "位"),
    "SFP": ("吗", "呢", "吧", "了"),
    "DE": ("的",),
    "LE": ("了",),
    "DEM": ("这", "那"),
    "SHI": ("是",),
    "YOU": ("有",),
    "WH": ("什么", "哪里", "谁"),
    "BA": ("把",),
}
# Open classes: jieba part-of-speech tag -> class.
OPEN_CLASSES: dict[str, str] = {"n": "N", "v": "V", "a": "A", "t": "T"}
TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("R", "ADV", "V", "N"),
    ("T", "R", "V", "N"),
    ("R", "ZAI", "N", "V", "N"),
    ("N", "DEG", "A"),
    ("R", "V", "NUM", "CL", "N"),
    ("R", "MOD", "V", "N"),
    ("R", "V", "N", "SFP"),
    ("T", "N", "DEG", "A"),
    ("R", "CONJ", "R", "ADV", "V", "N"),
    ("R", "DE", "N", "DEG", "A"),
    ("R", "V", "R", "DE", "N"),
    ("DEM", "CL", "N", "DEG", "A"),
    ("T", "R", "ADV", "MOD", "V", "N"),
    ("R", "ADV", "V", "N", "LE"),
    ("DEM", "SHI", "R", "DE", "N"),
    ("R", "SHI", "N"),
    ("R", "YOU", "NUM", "CL", "N"),
    ("R", "V", "WH"),
    ("R", "BA", "N", "V", "LE"),
)


def char_pinyin(ch: str) -> str:
    from pypinyin import Style, lazy_pinyin

    return lazy_pinyin(ch, style=Style.TONE3, neutral_tone_with_five=True)[0]


def word_pinyin(word: str) -> tuple[str, ...]:
    """Numbered pinyin per character, word-level context for polyphones (pypinyin phrases)."""
    from pypinyin import Style, lazy_pinyin

    syllables = tuple(lazy_pinyin(word, style=Style.TONE3, neutral_tone_with_five=True))
    if len(syllables) != len(word):
        raise ValueError(f"pinyin of {word!r} is not one syllable per character: {syllables}")
    return syllables


@lru_cache(maxsize=1)
def hsk_sentences() -> tuple[Sentence, ...]:
    """HSK sentences as words with the dataset's own numbered pinyin (aligned per character)."""
    import hsk_sentences_audio

    out = []
    for record in hsk_sentences_audio.load_sentences():
        hanzi = "".join(_HANZI.findall(record["chinese"]))
        # Erhua 儿 is written "r5"; espeak-ng cannot read it (no erhua): say a neutral "er5".
        syllables = ["er5" if s == "r5" else s for s in record["pinyin_numbered"].lower().replace("u:", "v").split()]
        if len(syllables) != len(hanzi) or not hanzi:
            continue  # not alignable: skipped (0 of 4,354 in version 1.0)
        words, pos = [], 0
        for token in record["tokens"]:
            w = "".join(_HANZI.findall(token["word"]))
            if w and hanzi.startswith(w, pos):
                words.append((w, tuple(syllables[pos:pos + len(w)])))
                pos += len(w)
        if pos != len(hanzi):  # tokens do not cover the sentence: one word per character instead
            words = [(ch, (syl,)) for ch, syl in zip(hanzi, syllables)]
        out.append(tuple(words))
    return tuple(out)


def select_inventory(size: int, max_homophones: int) -> tuple[str, ...]:
    """The `size` most frequent HSK characters, at most `max_homophones` per toned syllable.

    Characters of the closed word classes are always kept (the grammar needs them).
    """
    counts = Counter(ch for sentence in hsk_sentences() for word, _ in sentence for ch in word)
    required = {ch for words in CLOSED_CLASSES.values() for w in words for ch in w}
    per_syllable: Counter[str] = Counter(char_pinyin(ch) for ch in required)
    chosen = set(required)
    for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= size:
            break
        syllable = char_pinyin(ch)
        if ch not in chosen and per_syllable[syllable] < max_homophones:
            chosen.add(ch)
            per_syllable[syllable] += 1
    return tuple(sorted(chosen))


@lru_cache(maxsize=1)
def _jieba_words() -> tuple[tuple[str, int, str], ...]:
    import jieba

    path = Path(jieba.__file__).parent / "dict.txt"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, freq, tag = line.split(" ")
        rows.append((word, int(freq), tag))
    return tuple(rows)


@dataclass
class Grammar:
    """Word classes restricted to an inventory, with sampling weights."""

    classes: dict[str, list[Word]]
    weights: dict[str, np.ndarray]
    templates: list[tuple[str, ...]]

    @classmethod
    def build(cls, inventory: tuple[str, ...], min_freq: int = 20, alpha: float = 0.35) -> "Grammar":
        allowed = set(inventory)
        classes: dict[str, list[Word]] = {}
        freqs: dict[str, list[float]] = {}
        for name, words in CLOSED_CLASSES.items():
            kept = [w for w in words if set(w) <= allowed]
            classes[name] = [(w, word_pinyin(w)) for w in kept]
            freqs[name] = [1.0] * len(kept)
        closed = {w for words in CLOSED_CLASSES.values() for w in words}
        seen: set[tuple[str, str]] = set()
        for word, freq, tag in _jieba_words():
            name = OPEN_CLASSES.get(tag)
            if name is None or freq < min_freq or not 1 <= len(word) <= 3 or word in closed:
                continue
            if not set(word) <= allowed or (name, word) in seen:
                continue
            try:
                syllables = word_pinyin(word)
            except ValueError:
                continue
            seen.add((name, word))
            classes.setdefault(name, []).append((word, syllables))
            freqs.setdefault(name, []).append(float(freq))
        # Flattened frequencies (freq ** alpha): rare inventory characters still get examples.
        weights = {k: np.asarray(v) ** alpha / np.sum(np.asarray(v) ** alpha) for k, v in freqs.items() if v}
        templates = [t for t in TEMPLATES if all(classes.get(slot) for slot in t)]
        if not templates:
            raise ValueError("no template of the grammar can be filled from this inventory")
        return cls(classes, weights, templates)

    def rebalance(self, rng: np.random.Generator, num_samples: int = 5000, power: float = 1.0) -> None:
        """Up-weight words made of characters the grammar rarely produces (one pass).

        Weight *= mean over the word's characters of (median count / count) ** power, from
        `num_samples` sampled sentences: rare inventory characters get more examples.
        """
        counts = Counter(ch for _ in range(num_samples) for w, _ in self.sample(rng) for ch in w)
        median = float(np.median(list(counts.values())))
        for name, words in self.classes.items():
            boost = np.array([np.mean([(median / max(counts[ch], 1)) ** power for ch in w]) for w, _ in words])
            weights = self.weights[name] * boost
            self.weights[name] = weights / weights.sum()

    def sample(self, rng: np.random.Generator) -> Sentence:
        template = self.templates[int(rng.integers(len(self.templates)))]
        return tuple(self.classes[slot][int(rng.choice(len(self.classes[slot]), p=self.weights[slot]))]
                     for slot in template)


def sentence_text(sentence: Sentence) -> str:
    return "".join(w for w, _ in sentence)


def candidate_sentences(inventory: tuple[str, ...], num_generated: int, seed: int) -> list[Sentence]:
    """HSK sentences inside the inventory, then distinct generated ones; deterministic in `seed`."""
    allowed = set(inventory)
    out: list[Sentence] = []
    texts: set[str] = set()
    for sentence in hsk_sentences():
        text = sentence_text(sentence)
        if set(text) <= allowed and text not in texts:
            out.append(sentence)
            texts.add(text)
    grammar = Grammar.build(inventory)
    rng = np.random.default_rng([seed, 7])
    grammar.rebalance(rng)
    attempts = 0
    target = len(out) + num_generated
    while len(out) < target:
        attempts += 1
        if attempts > 50 * num_generated + 1000:
            raise RuntimeError(f"grammar produced only {len(out)} distinct sentences; enlarge the inventory")
        sentence = grammar.sample(rng)
        text = sentence_text(sentence)
        if text not in texts:
            out.append(sentence)
            texts.add(text)
    return out
