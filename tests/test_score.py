"""score.py on hand-made hyp/ref files whose CER is known by construction."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import jiwer
import pytest

from hdmole.data.text import normalize_text

from hdmole.score import (char_errors, comparison_markdown, corpus_cer, hallucination_reasons, read_keyed,
                          score_experiment, write_reports)


def write(path: Path, rows: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}\t{v}\n" for k, v in rows.items()), encoding="utf-8")


def make_exp(root: Path) -> Path:
    exp = root / "exp"
    t = exp / "decode" / "kespeech_test"
    # Beijing: refs 4 + 6 = 10 chars; 1 substitution (b1) + 1 insertion (b2) -> 20 %
    # Mandarin: ref 5 chars; hyp identical after normalisation (punctuation, width, spaces) -> 0 %
    # Ji-Lu: ref 4 chars, hyp missing -> 4 deletions -> 100 %
    write(t / "ref", {"b1": "今天天气", "b2": "我们去公园玩", "m1": "你好世界啊", "j1": "北京欢迎"})
    write(t / "hyp", {"b1": "今天大气", "b2": "我们去公园玩吧", "m1": "你好，世界 啊！", "x9": "多余"})
    write(t / "utt2accent", {"b1": "Beijing", "b2": "Beijing", "m1": "Mandarin", "j1": "Ji-Lu"})
    s = exp / "decode" / "aishell_test"
    # source: 10 ref chars, hyp has 2 substitutions -> 20 %; full-width Latin normalised
    write(s / "ref", {"a1": "ＡＢ好好学习天天向", "a2": "上"})
    write(s / "hyp", {"a1": "ab好好学习天天象", "a2": "下"})
    routing = {"layers": {
        "projector.linear1": {"tokens": 10.0, "active_mean": 2.0, "active_histogram": [0, 2, 6, 2],
                              "tau_current": 0.1, "accent_expert_weight": [[0.5, 0.3, 0.2]] + [None] * 8},
        "projector.linear2": {"tokens": 30.0, "active_mean": 1.0, "active_histogram": [0, 30, 0, 0],
                              "tau_current": 0.2, "accent_expert_weight": [[0.1, 0.1, 0.8]] + [None] * 8}}}
    (t / "routing.json").write_text(json.dumps(routing))
    (exp / "model_info.json").write_text(json.dumps({"trainable_params": 96, "full_params": 1000}))
    (exp / "train_log.jsonl").write_text("".join(json.dumps({"kind": "routing", "step": s, **routing}) + "\n"
                                                 for s in (10, 20)))
    return exp


def test_char_errors_counts():
    c = char_errors("abcd", "axcde")
    assert (c.sub, c.dels, c.ins, c.ref_chars) == (1, 0, 1, 4)
    assert char_errors("abc", "").dels == 3 and char_errors("", "ab").ins == 2
    assert corpus_cer(["ab", "cdef"], ["ab", "cdxf"]) == pytest.approx(100 / 6)


def random_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """References and hypotheses (substitutions, deletions, insertions, empty and unrelated
    hypotheses, a few empty references) over characters the normaliser keeps as they are."""
    rng = random.Random(seed)
    alphabet = "今天气很好我们去公园玩北京欢迎你世界上学习向ABCXYZ0123"
    refs, hyps = [], []
    for i in range(n):
        ref = "".join(rng.choices(alphabet, k=0 if i % 97 == 0 else rng.randint(1, 25)))
        hyp = list(ref)
        for _ in range(rng.randint(0, 6)):
            op, pos = rng.choice("sdi"), rng.randint(0, len(hyp))
            if op == "i":
                hyp.insert(pos, rng.choice(alphabet))
            elif hyp and pos < len(hyp):
                if op == "s":
                    hyp[pos] = rng.choice(alphabet)
                else:
                    del hyp[pos]
        if i % 23 == 0:
            hyp = [] if i % 2 else rng.choices(alphabet, k=rng.randint(1, 30))
        refs.append(ref)
        hyps.append("".join(hyp))
    return refs, hyps


def test_corpus_cer_agrees_with_jiwer():
    """An independent implementation: jiwer's cer is corpus-level too (total edits over total
    reference characters). Both get normalised text (normalize_text leaves these unchanged),
    so only the edit distance is compared."""
    refs, hyps = random_pairs(400)
    assert all(normalize_text(t) == t for t in refs + hyps)
    assert sum(map(len, refs)) > 0 and len(set(refs)) > 300
    for ref, hyp in zip(refs, hyps):  # per utterance: the same minimal number of edits
        out = jiwer.process_characters(ref, hyp)
        assert char_errors(ref, hyp).errors == out.substitutions + out.deletions + out.insertions, (ref, hyp)
    assert corpus_cer(refs, hyps) == pytest.approx(100 * jiwer.cer(refs, hyps), rel=1e-12)
    assert 5 < corpus_cer(refs, hyps) < 60  # a mix of error rates, not all-correct or all-wrong


def test_experiment_scores_known_by_construction(tmp_path: Path):
    exp = make_exp(tmp_path)
    score, sets = score_experiment(exp)
    # Beijing: b1 1 sub (4 chars), b2 1 ins (6 chars) -> 2/10
    assert score.accent_cer["Beijing"] == pytest.approx(20.0)
    assert score.accent_cer["Mandarin"] == pytest.approx(0.0)
    assert score.accent_cer["Ji-Lu"] == pytest.approx(100.0)
    assert list(score.accent_cer) == ["Mandarin", "Beijing", "Ji-Lu"]  # ACCENTS order
    assert score.mean_accent_cer == pytest.approx(40.0)
    assert score.target_cer == pytest.approx(100 * 6 / 19)
    assert score.source_cer == pytest.approx(20.0)
    assert score.missing_hyps == 1
    assert score.mean_active_experts == pytest.approx((10 * 2 + 30 * 1) / 40)
    assert score.trainable_percent_of_full == pytest.approx(9.6)
    kes = next(s for s in sets if s.name == "kespeech_test")
    assert kes.extra_hyps == 1


def test_reports_and_plots(tmp_path: Path):
    exp = make_exp(tmp_path)
    score = write_reports(exp, name="hdmole")
    text = (exp / "RESULTS.md").read_text()
    assert "| kespeech_test | Beijing | 2 | 10 | 1 | 0 | 1 | 20.00 |" in text
    assert "| % of full fine-tuning | 9.6 |" in text
    for png in ("cer_per_accent", "active_experts_per_layer", "accent_expert_heatmap", "thresholds_over_training"):
        assert (exp / "plots" / f"{png}.png").stat().st_size > 1000
    table = comparison_markdown([score, score])
    assert table.count("| hdmole | 0.00 | 20.00 | 100.00 | 40.00 | 20.00 | 96 | 9.6 | 1.25 |") == 2


def test_hallucinations():
    assert hallucination_reasons("你好", "你好你好你好你好")  # loop and > 2x length
    assert hallucination_reasons("今天天气很好", "今天天天天气") == ["repeated n-gram '天天天天'"]
    assert hallucination_reasons("哈哈哈", "哈哈哈") == []  # the reference has the same repetition
    assert hallucination_reasons("今天天气", "今天天气") == []


def test_bad_files_name_file_and_line(tmp_path: Path):
    p = tmp_path / "hyp"
    p.write_text("a\tx\na\ty\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hyp:2: duplicate"):
        read_keyed(p)
    p.write_text("a x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hyp:1: expected"):
        read_keyed(p, allow_empty_value=False)
    with pytest.raises(FileNotFoundError, match="no decoded test sets"):
        score_experiment(tmp_path)
    assert math.isnan(char_errors("", "").cer)
