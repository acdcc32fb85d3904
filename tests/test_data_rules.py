"""Accent rules on numbered pinyin and the controlled text inventory (no audio rendering)."""
from collections import Counter

import pytest

from hdmole.data.accent_rules import ACCENT_RULES, ACCENT_STYLES, valid_syllables
from hdmole.data.accents import ACCENTS
from hdmole.data.sentences import candidate_sentences, select_inventory, sentence_text
from hdmole.data.speech import CHANNELS, Espeak


@pytest.fixture(scope="module")
def inventory():
    return select_inventory(300, 2)


@pytest.fixture(scope="module")
def sentences(inventory):
    return candidate_sentences(inventory, 1500, seed=0)


def test_one_rule_set_and_style_per_label():
    assert tuple(ACCENT_RULES) == ACCENTS and tuple(ACCENT_STYLES) == ACCENTS
    assert all(style.channel in CHANNELS for style in ACCENT_STYLES.values())


@pytest.mark.parametrize(
    "accent, syllable, expected",
    [
        ("Southwestern", "zhong1", "zong1"),  # zh -> z, tone 1 kept
        ("Southwestern", "nan2", "lan3"),  # n -> l, tone 2 -> 3
        ("Southwestern", "ming2", "min3"),  # -ing -> -in
        ("Southwestern", "hua4", "fa2"),  # hu -> f, tone 4 -> 2
        ("Northeastern", "zi4", "zhi4"),  # z -> zh (conflicts with Southwestern)
        ("Northeastern", "ren2", "yin2"),
        ("Jiang-Huai", "lao3", "nao2"),  # l -> n (conflicts with Southwestern)
        ("Lan-Yin", "fan4", "huang2"),  # -n -> -ng then f -> hu
        ("Jiao-Liao", "xi3", "si1"),
        ("Zhongyuan", "shui3", "fei1"),
        ("Ji-Lu", "ai4", "nai5"),
        ("Mandarin", "zhong1", "zhong1"),
    ],
)
def test_rule_examples(accent, syllable, expected):
    assert ACCENT_RULES[accent].syllable(syllable) == expected


def test_beijing_neutral_tone_on_word_final_syllables():
    assert ACCENT_RULES["Beijing"].words([["peng2", "you3"], ["hao3"]]) == [["peng2", "you5"], ["hao3"]]


def test_rules_change_speech_and_conflict(sentences):
    """Every non-standard accent changes a sizeable share of syllables, and accents disagree with
    each other, so no single rewrite maps all of them back to the standard."""
    syllables = [s for sentence in sentences[:500] for _, syl in sentence for s in syl]
    spoken = {a: [ACCENT_RULES[a].syllable(s) for s in syllables] for a in ACCENTS}
    for accent in ACCENTS[2:]:
        changed = sum(x != y for x, y in zip(syllables, spoken[accent])) / len(syllables)
        assert changed > 0.25, (accent, changed)
    # Conflict: a spoken syllable that stands for different standard syllables in different
    # accents (e.g. "zi" is zhi in Southwestern but zi in Northeastern speech).
    maps = {a: {} for a in ACCENTS[2:]}
    for accent in maps:
        for std, said in zip(syllables, spoken[accent]):
            maps[accent].setdefault(said, set()).add(std)
    conflicts = {said for a in maps for b in maps if a < b
                 for said in maps[a].keys() & maps[b].keys() if not maps[a][said] & maps[b][said]}
    assert len(conflicts) > 50


def test_rule_outputs_are_valid_pinyin_read_by_espeak(sentences):
    """Every syllable the rules produce is Mandarin and espeak-ng reads it as Mandarin (an
    unknown word would fall back to English, shown as "(en)")."""
    produced = {ACCENT_RULES[a].syllable(s) for a in ACCENTS for sentence in sentences for _, syl in sentence for s in syl}
    assert all(p[:-1] in valid_syllables() for p in produced)
    engine = Espeak.get()
    batch = sorted(produced)
    for i in range(0, len(batch), 50):
        phonemes = engine.phonemes(" ".join(batch[i:i + 50]))
        assert "(en)" not in phonemes, batch[i:i + 50]


def test_inventory_is_controlled(inventory, sentences):
    assert len(inventory) == 300
    for sentence in sentences:
        assert set(sentence_text(sentence)) <= set(inventory)
    texts = [sentence_text(s) for s in sentences]
    assert len(set(texts)) == len(texts)
    counts = Counter(ch for t in texts for ch in t)
    assert len(counts) >= 290  # (almost) the whole inventory is used


def test_sentences_are_deterministic(inventory):
    a = [sentence_text(s) for s in candidate_sentences(inventory, 200, seed=3)]
    b = [sentence_text(s) for s in candidate_sentences(inventory, 200, seed=3)]
    c = [sentence_text(s) for s in candidate_sentences(inventory, 200, seed=4)]
    assert a == b and a != c
