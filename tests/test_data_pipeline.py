"""Synthetic corpus -> lhotse preparation -> cut sets -> Batch, on the `ci` corpus, plus every
bad-input case of the preparation (each an error naming the file, or a counted skip)."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hdmole.data.accents import ACCENTS, accent_id
from hdmole.data.config import DataConfig
from hdmole.data.dataset import collate, cuts_by_accent, load_cuts, make_dataloader
from hdmole.data.features import LogMelExtractor, compute_features, load_cut_features
from hdmole.data.prepare import CorpusError, prepare_corpus
from hdmole.data.synthetic import MANIFEST_NAME, generate, plan_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "corpus"
    generate(out, "ci", seed=0, nj=2, progress=False)
    return out


def _cfg(tmp_path: Path, corpus: Path, **kw) -> DataConfig:
    return DataConfig(corpus_dir=str(corpus), manifest_dir=str(tmp_path / "manifests"),
                      cuts_dir=str(tmp_path / "cuts"), num_jobs=1, **kw)


def _copy(corpus: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(corpus, dst)
    return dst


# ---------------------------------------------------------------------------- generator


def test_layouts_and_labels(corpus):
    kes = corpus / "KeSpeech/Tasks/ASR"
    assert sorted(p.name for p in kes.iterdir()) == sorted(
        ["train_phase1", "train_phase2", "dev_phase1", "dev_phase2", "test"])
    labels = set()
    for part in kes.iterdir():
        ids = [[line.split()[0] for line in (part / n).read_text().splitlines()]
               for n in ("wav.scp", "text", "utt2subdialect", "utt2spk")]
        assert ids[0] and all(i == ids[0] for i in ids)
        labels |= {line.split()[1] for line in (part / "utt2subdialect").read_text().splitlines()}
        for line in (part / "wav.scp").read_text().splitlines():
            rel = line.split()[1]
            assert rel.startswith("Audio/") and sf.info(str(corpus / "KeSpeech" / rel)).samplerate == 16000
    assert labels == set(ACCENTS)
    transcript = (corpus / "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt").read_text().splitlines()
    wavs = list((corpus / "aishell/data_aishell/wav").rglob("*.wav"))
    assert len(transcript) == len(wavs) == 86
    assert "CC-BY-SA-4.0" in (corpus / "README.md").read_text() and "hsk-sentences-audio" in (corpus / "LICENCE.md").read_text()


def test_splits_disjoint_in_text_and_speakers():
    plan = plan_corpus("ci", seed=0)
    by_split: dict[str, set] = {"train": set(), "dev": set(), "test": set()}
    speakers: dict[str, set] = {"train": set(), "dev": set(), "test": set()}
    for u in plan.utterances:
        split = u.part.split("_")[0]
        by_split[split].add(u.text)
        speakers[split].add(u.speaker)
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not by_split[a] & by_split[b] and not speakers[a] & speakers[b]


def test_same_seed_byte_identical_any_nj(corpus, tmp_path):
    again = tmp_path / "again"
    generate(again, "ci", seed=0, nj=1, progress=False)
    cmp = filecmp.dircmp(corpus, again)
    files = [p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file()]
    assert len(files) > 200
    for rel in files:
        assert (corpus / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert not cmp.left_only and not cmp.right_only


def test_other_seed_differs_and_refuses_to_mix(corpus, tmp_path):
    assert plan_corpus("ci", 1).digest() != plan_corpus("ci", 0).digest()
    out = _copy(corpus, tmp_path)
    with pytest.raises(FileExistsError, match="another size/seed"):
        generate(out, "ci", seed=1, nj=1, progress=False)


def test_rerun_is_noop_and_resume_after_interruption(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    wav = next((out / "KeSpeech/Audio").rglob("*.wav"))
    reference = wav.read_bytes()
    stamp = wav.stat().st_mtime_ns
    generate(out, "ci", seed=0, nj=1, progress=False)  # complete: nothing rewritten
    assert wav.stat().st_mtime_ns == stamp
    # Simulate an interruption: no manifest yet, one wav missing, a stray temp file.
    (out / MANIFEST_NAME).unlink()
    (out / ".synthetic_plan").write_text(plan_corpus("ci", 0).digest() + "\n")
    wav.unlink()
    generate(out, "ci", seed=0, nj=1, progress=False)
    assert wav.read_bytes() == reference and (out / MANIFEST_NAME).exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary left behind


# ---------------------------------------------------------------------------- preparation


def test_prepare_both_corpora_keeps_accents(corpus, tmp_path):
    cfg = _cfg(tmp_path, corpus)
    reports = {c: prepare_corpus(c, cfg) for c in ("kespeech", "aishell")}
    for corpus_name in ("kespeech", "aishell"):
        for split in ("train", "dev", "test"):
            cuts = load_cuts(cfg.cuts_path(corpus_name, split))
            assert len(cuts) > 0
            for cut in cuts:
                assert cut.id == cut.supervisions[0].id  # results are keyed by utterance id
                assert cut.supervisions[0].language in (*ACCENTS, "Chinese")
    test = load_cuts(cfg.cuts_path("kespeech", "test"))
    assert {c.supervisions[0].language for c in test} == set(ACCENTS)
    groups = cuts_by_accent(test)
    assert sorted(groups) == sorted(ACCENTS) and all(len(g) == 4 for g in groups.values())
    assert list(cuts_by_accent(load_cuts(cfg.cuts_path("aishell", "test")))) == ["Mandarin"]
    # The label comes from utt2subdialect, for every utterance.
    truth = dict(line.split() for line in (corpus / "KeSpeech/Tasks/ASR/test/utt2subdialect").read_text().splitlines())
    assert {c.id: c.supervisions[0].language for c in test} == truth
    stats = json.loads((tmp_path / "cuts/kespeech_stats.json").read_text())
    assert sum(v["utterances"] for v in stats["kept"]["test"].values()) == len(truth)
    assert (tmp_path / "cuts/kespeech_stats.md").read_text().count("|") > 20
    assert reports["aishell"].dropped == {}


def _break_kespeech(corpus: Path, part: str = "test") -> tuple[Path, list[str]]:
    part_dir = corpus / "KeSpeech/Tasks/ASR" / part
    return part_dir, (part_dir / "wav.scp").read_text().splitlines()


def _wav_of(corpus: Path, line: str) -> Path:
    return corpus / "KeSpeech" / line.split()[1]


def _error_then_counted_drop(out: Path, tmp_path: Path, error: str, reason: str, utt: str,
                             corpus: str = "kespeech", split: str = "test", drops: int = 1) -> None:
    """Bad input stops preparation with `error`; with skip_bad it is a counted drop in the stats."""
    with pytest.raises(CorpusError, match=error):
        prepare_corpus(corpus, _cfg(tmp_path, out))
    report = prepare_corpus(corpus, _cfg(tmp_path, out, skip_bad=True))
    assert report.dropped[(split, reason)] == drops
    assert utt not in {c.id for s in ("train", "dev", "test") for c in load_cuts(_cfg(tmp_path, out).cuts_path(corpus, s))}
    stats = json.loads((tmp_path / f"cuts/{corpus}_stats.json").read_text())
    assert {"split": split, "reason": reason, "count": drops} in stats["dropped"]


@pytest.mark.parametrize("damage, reason", [("missing", "missing_audio"), ("corrupt", "corrupt_audio"),
                                            ("empty", "empty_audio"), ("nan", "nonfinite_audio"),
                                            ("inf", "nonfinite_audio"), ("stereo", "multichannel_audio")])
def test_bad_audio_error_or_counted_skip(corpus, tmp_path, damage, reason):
    out = _copy(corpus, tmp_path)
    _, lines = _break_kespeech(out)
    wav = _wav_of(out, lines[2])
    audio = sf.read(str(wav), dtype="float32")[0]
    if damage == "missing":
        wav.unlink()
    elif damage == "corrupt":
        wav.write_bytes(b"RIFF\x00\x00garbage" * 10)
    elif damage == "empty":
        sf.write(str(wav), np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    elif damage in ("nan", "inf"):  # a float wav holds any float32, NaN and inf included
        audio[len(audio) // 2] = np.nan if damage == "nan" else np.inf
        sf.write(str(wav), audio, 16000, subtype="FLOAT")
    else:
        sf.write(str(wav), np.stack([audio, audio], axis=1), 16000, subtype="PCM_16")
    _error_then_counted_drop(out, tmp_path, rf"{reason.replace('_', ' ')}: .*{wav.name}.*wav.scp:3", reason,
                             lines[2].split()[0])
    assert len(load_cuts(_cfg(tmp_path, out).cuts_path("kespeech", "test"))) == len(lines) - 1


def test_wrong_sample_rate_is_resampled(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    _, lines = _break_kespeech(out)
    wav = _wav_of(out, lines[0])
    audio, sr = sf.read(str(wav))
    from scipy.signal import resample_poly

    sf.write(str(wav), resample_poly(audio, 441, 320), 22050, subtype="PCM_16")
    cfg = _cfg(tmp_path, out)
    report = prepare_corpus("kespeech", cfg)
    assert report.resampled == 1
    cut = next(c for c in load_cuts(cfg.cuts_path("kespeech", "test")) if c.id == lines[0].split()[0])
    assert cut.sampling_rate == 16000 and abs(cut.duration - len(audio) / sr) < 0.01
    samples = cut.load_audio()[0]
    assert samples.shape[0] == cut.num_samples
    assert np.corrcoef(samples[: len(audio)], audio[: len(samples)])[0, 1] > 0.9


def test_text_and_duration_filters_are_counted(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    part_dir, lines = _break_kespeech(out)
    text = (part_dir / "text").read_text().splitlines()
    ids = [line.split()[0] for line in lines]
    text[0] = f"{ids[0]} <SPOKEN_NOISE>，。"  # empty after normalisation
    text[1] = f"{ids[1]} 你好ДА"  # unsupported characters
    (part_dir / "text").write_text("\n".join(text) + "\n")
    sf.write(str(_wav_of(out, lines[2])), np.zeros(16000 * 31, dtype=np.float32) + 0.01, 16000)  # 31 s
    report = prepare_corpus("kespeech", _cfg(tmp_path, out))
    for reason in ("empty_text", "unsupported_chars", "longer_than_encoder_max"):
        assert report.dropped[("test", reason)] == 1, reason
    kept = {c.id for c in load_cuts(_cfg(tmp_path, out).cuts_path("kespeech", "test"))}
    assert kept == set(ids[3:])


def test_misaligned_kaldi_files_name_file_and_line(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    part_dir = out / "KeSpeech/Tasks/ASR/dev_phase1"
    rows = (part_dir / "utt2spk").read_text().splitlines()
    rows[0], rows[1] = rows[1], rows[0]
    (part_dir / "utt2spk").write_text("\n".join(rows) + "\n")
    with pytest.raises(CorpusError, match=r"dev_phase1/utt2spk:1: utterance id"):
        prepare_corpus("kespeech", _cfg(tmp_path, out))
    rows[0], rows[1] = rows[1], rows[0]
    (part_dir / "utt2spk").write_text("\n".join(rows[:-1]) + "\n")  # one line short
    with pytest.raises(CorpusError, match=r"wav.scp:\d+: wav.scp has more lines than utt2spk"):
        prepare_corpus("kespeech", _cfg(tmp_path, out))


def test_missing_layout_file_shows_expected_tree(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    (out / "KeSpeech/Tasks/ASR/test/utt2subdialect").unlink()
    with pytest.raises(CorpusError, match=r"(?s)missing file: .*test/utt2subdialect.*expected KeSpeech layout"):
        prepare_corpus("kespeech", _cfg(tmp_path, out))
    (out / "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt").unlink()
    with pytest.raises(CorpusError, match=r"(?s)aishell_transcript_v0.8.txt.*expected AISHELL-1 layout"):
        prepare_corpus("aishell", _cfg(tmp_path, out))


def test_aishell_missing_wav_and_untranscribed_wav(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    transcript = out / "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt"
    rows = transcript.read_text().splitlines()
    first = rows[0].split()[0]
    next((out / "aishell/data_aishell/wav").rglob(f"{first}.wav")).unlink()
    with pytest.raises(CorpusError, match=r"missing audio: .*aishell_transcript_v0.8.txt:1"):
        prepare_corpus("aishell", _cfg(tmp_path, out))
    transcript.write_text("\n".join(rows[:-1]) + "\n")  # last wav loses its transcript
    report = prepare_corpus("aishell", _cfg(tmp_path, out, skip_bad=True))
    assert sum(n for (s, r), n in report.dropped.items() if r == "missing_audio") == 1
    assert sum(n for (s, r), n in report.dropped.items() if r == "no_transcript") == 1
    cfg = _cfg(tmp_path, out)
    total = sum(len(load_cuts(cfg.cuts_path("aishell", s))) for s in ("train", "dev", "test"))
    assert total == len(rows) - 2
    for cut in load_cuts(cfg.cuts_path("aishell", "train")):  # real files, not the clean view's symlinks
        assert not os.path.islink(cut.recording.sources[0].source)


def test_empty_split_is_an_error(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    with pytest.raises(CorpusError, match=r"kespeech train: no utterance left \(dropped in train: too_short \d+\)"
                                          r"; see the drop counts in .*kespeech_stats.md"):
        prepare_corpus("kespeech", _cfg(tmp_path, out, min_duration=19.0))
    assert "| train | too_short |" in (tmp_path / "cuts/kespeech_stats.md").read_text()


# ---------------------------------------------------------------------------- hostile input


def _set_line(path: Path, index: int, line: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[index] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name, value, reason, error", [
    ("utt2subdialect", "Cantonese", "unknown_accent", r"utt2subdialect:3: .*unknown accent label 'Cantonese'"),
    ("wav.scp", "../../outside.wav", "path_outside_corpus", r"wav.scp:3: wav path '../../outside.wav' .* leaves"),
    ("wav.scp", "<outside>", "path_outside_corpus", r"wav.scp:3: wav path '/.*outside.wav' .* leaves"),
])
def test_bad_listing_value_error_or_counted_skip(corpus, tmp_path, name, value, reason, error):
    """An unknown accent label used to pass preparation and stop training; a wav path leaving the
    corpus would be read (here a valid wav) wherever it points."""
    out = _copy(corpus, tmp_path)
    part_dir, lines = _break_kespeech(out)
    utt = lines[2].split()[0]
    shutil.copy(_wav_of(out, lines[2]), tmp_path / "outside.wav")
    _set_line(part_dir / name, 2, f"{utt} {str(tmp_path / 'outside.wav') if value == '<outside>' else value}")
    _error_then_counted_drop(out, tmp_path, error, reason, utt)


@pytest.mark.parametrize("where", ["same part", "another part"])
def test_duplicate_kespeech_id_error_or_counted_skip(corpus, tmp_path, where):
    out = _copy(corpus, tmp_path)
    part_dir, lines = _break_kespeech(out)
    target = part_dir if where == "same part" else out / "KeSpeech/Tasks/ASR/dev_phase1"
    for name in ("wav.scp", "text", "utt2subdialect", "utt2spk"):  # a whole utterance listed twice
        first = (part_dir / name).read_text(encoding="utf-8").splitlines()[0]
        with open(target / name, "a", encoding="utf-8") as f:
            f.write(first + "\n")
    utt = lines[0].split()[0]
    if where == "same part":
        _error_then_counted_drop(out, tmp_path, rf"utterance id '{utt}' listed 2 times: .*test/wav.scp:1, "
                                 rf".*test/wav.scp:{len(lines) + 1}", "duplicate_id", utt, drops=2)
    else:  # one copy per split: one drop each
        _error_then_counted_drop(out, tmp_path, rf"utterance id '{utt}' listed 2 times: .*dev_phase1/wav.scp:\d+, "
                                 r".*test/wav.scp:1", "duplicate_id", utt, split="dev")
        assert prepare_corpus("kespeech", _cfg(tmp_path, out, skip_bad=True)).dropped[("test", "duplicate_id")] == 1


def test_duplicate_aishell_wav_name_error_or_counted_skip(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    wav_root = out / "aishell/data_aishell/wav"
    wav = sorted((wav_root / "train").rglob("*.wav"))[0]
    (wav_root / "dev/S_COPY").mkdir()
    shutil.copy(wav, wav_root / "dev/S_COPY" / wav.name)
    _error_then_counted_drop(out, tmp_path, rf"utterance id '{wav.stem}' listed 2 times: .*train/.*{wav.name}, "
                             rf".*dev/S_COPY/{wav.name}", "duplicate_id", wav.stem, corpus="aishell", split="train")


@pytest.mark.parametrize("listing", ["KeSpeech/Tasks/ASR/test/wav.scp", "KeSpeech/Tasks/ASR/test/text",
                                     "KeSpeech/Tasks/ASR/test/utt2subdialect", "KeSpeech/Tasks/ASR/test/utt2spk",
                                     "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt"])
def test_non_utf8_listing_names_file_and_line(corpus, tmp_path, listing):
    out = _copy(corpus, tmp_path)
    path = out / listing
    lines = path.read_bytes().split(b"\n")
    lines[1] += " 普通话".encode("gbk")  # a GBK copy of the corpus: a structural error, never skipped
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorpusError, match=rf"{listing.split('/')[-1]}:2: not UTF-8 \(byte 0x"):
        prepare_corpus("kespeech" if listing.startswith("KeSpeech") else "aishell", _cfg(tmp_path, out, skip_bad=True))


def test_empty_part_names_part_and_stats(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    for name in ("wav.scp", "text", "utt2subdialect", "utt2spk"):
        (out / "KeSpeech/Tasks/ASR/dev_phase2" / name).write_text("")
    with pytest.raises(CorpusError, match=r"kespeech part 'dev_phase2': no utterance left \(dropped in dev: nothing\)"
                                          r"; see the drop counts in .*kespeech_stats.md"):
        prepare_corpus("kespeech", _cfg(tmp_path, out))
    # A part emptied by skipped utterances: the counts are in the message and in the stats.
    out2 = tmp_path / "second"
    shutil.copytree(corpus, out2)
    _, lines = _break_kespeech(out2)
    for line in lines:
        _wav_of(out2, line).unlink()
    with pytest.raises(CorpusError, match=rf"kespeech part 'test': .*\(dropped in test: missing_audio {len(lines)}\)"):
        prepare_corpus("kespeech", _cfg(tmp_path, out2, skip_bad=True))
    assert f"| test | missing_audio | {len(lines)} |" in (tmp_path / "cuts/kespeech_stats.md").read_text()
    for wav in (out2 / "aishell/data_aishell/wav/dev").rglob("*.wav"):
        wav.unlink()
    with pytest.raises(CorpusError, match=r"aishell part 'dev': no utterance left"):
        prepare_corpus("aishell", _cfg(tmp_path, out2, skip_bad=True))


def test_crlf_bom_and_blank_lines_are_read_like_plain_files(corpus, tmp_path):
    """Windows line ends, a BOM and blank lines (lhotse's readers fail on the last two) change nothing."""
    plain = _cfg(tmp_path / "plain", corpus)
    out = _copy(corpus, tmp_path)
    listings = [*(out / "KeSpeech/Tasks/ASR").rglob("*"), out / "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt"]
    for path in (p for p in listings if p.is_file()):
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_bytes("\ufeff\r\n".encode() + "\r\n\r\n".join(lines).encode() + b"\r\n\r\n")
    messy = _cfg(tmp_path / "messy", out)
    for corpus_name in ("kespeech", "aishell"):
        assert prepare_corpus(corpus_name, plain).dropped == prepare_corpus(corpus_name, messy).dropped == {}
        for split in ("train", "dev", "test"):
            def labels(cfg):
                return [(c.id, c.supervisions[0].text, c.supervisions[0].language, c.supervisions[0].speaker)
                        for c in load_cuts(cfg.cuts_path(corpus_name, split))]
            assert labels(plain) == labels(messy)


def test_line_without_transcript_is_a_counted_drop(corpus, tmp_path):
    out = _copy(corpus, tmp_path)
    part_dir, lines = _break_kespeech(out)
    _set_line(part_dir / "text", 1, lines[1].split()[0] + "   ")
    transcript = out / "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt"
    first = transcript.read_text(encoding="utf-8").splitlines()[0].split()[0]
    _set_line(transcript, 0, first)
    report = prepare_corpus("kespeech", _cfg(tmp_path, out))  # a filter like punctuation-only text: no skip_bad needed
    assert report.dropped == {("test", "empty_text"): 1}
    assert report.examples["empty_text"] == [f"{part_dir / 'text'}:2: no transcript for {lines[1].split()[0]!r}"]
    report = prepare_corpus("aishell", _cfg(tmp_path, out))
    assert sum(n for (_, r), n in report.dropped.items() if r == "empty_text") == 1
    assert first not in {c.id for s in ("train", "dev", "test") for c in load_cuts(_cfg(tmp_path, out).cuts_path("aishell", s))}


# ---------------------------------------------------------------------------- features and loader


def test_logmel_matches_whisper_30s_padding():
    """Unpadded extraction equals the 30 s padded reference on the valid frames."""
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * 2 + 77) * 0.1).astype(np.float32)
    ours = LogMelExtractor(80)(audio)
    reference = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")
    ref = reference["input_features"][0][:, : ours.shape[1]]
    assert ours.shape == (80, len(audio) // 160)
    np.testing.assert_allclose(ours[:, :-2], ref[:, :-2], atol=1e-4)  # last frames see the padding


def test_collate_shapes_and_masks():
    feats = [np.full((4, n), float(n), dtype=np.float32) for n in (5, 3, 7)]
    batch = collate(["a", "b", "c"], feats, [0, 8, -1], ["x", "y", ""])
    assert batch.features.shape == (3, 4, 7) and batch.feature_lens.tolist() == [5, 3, 7]
    mask = batch.feature_mask
    assert mask.sum(1).tolist() == [5, 3, 7]
    assert (batch.features[1, :, 3:] == 0).all() and (batch.features[1, :, :3] == 3).all()
    assert batch.accents.tolist() == [0, 8, -1]
    with pytest.raises(ValueError, match="mel bins"):
        collate(["a", "b"], [np.zeros((4, 2)), np.zeros((5, 2))], [0, 0], ["", ""])


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> DataConfig:
    tmp = tmp_path_factory.mktemp("prepared")
    cfg = _cfg(tmp, corpus)
    prepare_corpus("kespeech", cfg)
    return cfg


@pytest.mark.parametrize("sampler", ["simple", "bucketing"])
def test_dataloader_yields_batches(prepared, sampler):
    from dataclasses import replace

    cfg = replace(prepared, sampler=sampler, batch_duration=15.0, num_buckets=2, num_workers=0)
    cuts = load_cuts(cfg.cuts_path("kespeech", "test"))
    labels = {c.id: accent_id(c.supervisions[0].language) for c in cuts}
    texts = {c.id: c.supervisions[0].text for c in cuts}
    seen = []
    for batch in make_dataloader(cfg.cuts_path("kespeech", "test"), cfg, num_mel_bins=80, shuffle=False):
        assert batch.features.shape[1] == 80 and batch.features.dtype.is_floating_point
        assert int(batch.feature_lens.max()) == batch.features.shape[2]
        assert sum(batch.feature_lens.tolist()) / 100 <= 15.0 + 0.5
        assert batch.accents.tolist() == [labels[i] for i in batch.ids]
        assert batch.texts == [texts[i] for i in batch.ids]
        seen += batch.ids
    assert sorted(seen) == sorted(labels)


def test_dataloader_ranks_are_disjoint(prepared):
    from dataclasses import replace

    cfg = replace(prepared, sampler="simple", batch_duration=6.0, num_workers=0)
    path = cfg.cuts_path("kespeech", "train")
    shares = [[i for b in make_dataloader(path, cfg, 80, shuffle=True, rank=r, world_size=2) for i in b.ids]
              for r in (0, 1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert len(set(shares[0]) | set(shares[1])) <= len(load_cuts(path))


def _stored(prepared, tmp_path, storage: str, **kw) -> DataConfig:
    from dataclasses import replace

    cfg = replace(prepared, sampler="simple", batch_duration=1000.0, num_workers=0, feature_storage=storage,
                  feature_dir=str(tmp_path / storage), **kw)
    compute_features(cfg, cfg.cuts_path("kespeech", "dev"), cfg.feature_cuts_path("kespeech", "dev"), 80)
    return cfg


def test_stored_float16_features_are_the_loaders_own(prepared, tmp_path):
    """numpy_hdf5 storage: the on-the-fly values rounded to float16, in the input's cut order,
    in one HDF5 file (not one file per cut)."""
    from dataclasses import replace

    cfg = _stored(prepared, tmp_path, "numpy_hdf5")
    on_the_fly = replace(cfg, feature_storage=None)
    plain_path, stored_path = on_the_fly.feature_cuts_path("kespeech", "dev"), cfg.feature_cuts_path("kespeech", "dev")
    assert plain_path != stored_path and [c.id for c in load_cuts(stored_path)] == [c.id for c in load_cuts(plain_path)]
    plain = next(iter(make_dataloader(plain_path, on_the_fly, 80, shuffle=False)))
    stored = next(iter(make_dataloader(stored_path, cfg, 80, shuffle=False)))
    assert stored.ids == plain.ids and stored.feature_lens.tolist() == plain.feature_lens.tolist()
    assert (stored.features == plain.features.half().float()).all()
    files = sorted(f.name for f in (tmp_path / "numpy_hdf5").rglob("*") if f.is_file())
    assert files == ["00000.h5", "kespeech_dev.jsonl.gz"]


def test_stored_lilcom_features_are_within_their_tick(prepared, tmp_path):
    cfg = _stored(prepared, tmp_path, "lilcom_chunky", lilcom_tick_power=-6)
    extractor = LogMelExtractor(80)
    for cut in load_cuts(cfg.feature_cuts_path("kespeech", "dev")):
        ours = extractor(cut.load_audio()[0])
        stored = load_cut_features(cut, 80)
        assert stored.shape == ours.shape == (80, cut.num_samples // 160)
        assert np.abs(stored - ours).max() <= 2.0 ** -6 / 2 + 1e-6
        assert not np.array_equal(stored, ours)  # lossy: the check above can fail
    with pytest.raises(ValueError, match="80 mel bins, the model takes 128"):
        load_cut_features(cut, 128)
    with pytest.raises(ValueError, match="no stored features"):
        load_cut_features(next(iter(load_cuts(cfg.cuts_path("kespeech", "dev")))), 80)


def test_all_features_report_and_parallel_jobs(corpus, tmp_path):
    """Stage 1's features step (the command line, mel bins from the encoder checkpoint) over
    every cut set, two processes: counts, bytes and files in stats.json, the same values as one
    process."""
    cfg = _cfg(tmp_path, corpus, feature_storage="numpy_hdf5", feature_dir=str(tmp_path / "fbank"))
    prepare_corpus("aishell", cfg)
    prepare_corpus("kespeech", cfg)
    from dataclasses import replace

    two = replace(cfg, num_jobs=2, feature_dir=str(tmp_path / "fbank2"))
    from hdmole.bin.prepare import main

    encoder = Path(__file__).resolve().parent.parent / "pretrained" / "whisper"  # 80 mel bins
    main(["features", f"data.cuts_dir={cfg.cuts_dir}", "data.num_jobs=2", "data.feature_storage=numpy_hdf5",
          f"data.feature_dir={two.feature_dir}", f"model.encoder_dir={encoder}"])
    report = json.loads((tmp_path / "fbank2" / "stats.json").read_text())
    assert report["num_mel_bins"] == 80 and report["storage"] == "numpy_hdf5"
    for name, counts in report["cut_sets"].items():
        corpus_name, split = name.split("_")
        assert counts["cuts"] == len(load_cuts(cfg.cuts_path(corpus_name, split))) and counts["files"] == 2
        assert counts["bytes"] > counts["frames"] * 80 * 2  # float16 values plus HDF5's own structure
    compute_features(cfg, cfg.cuts_path("aishell", "dev"), cfg.feature_cuts_path("aishell", "dev"), 80)  # one job
    one = {c.id: c for c in load_cuts(cfg.feature_cuts_path("aishell", "dev"))}
    for cut in load_cuts(two.feature_cuts_path("aishell", "dev")):
        assert np.array_equal(load_cut_features(cut, 80), load_cut_features(one[cut.id], 80))


def test_features_of_a_vanished_wav_name_the_cut(prepared, tmp_path):
    """lhotse drops a cut whose audio no longer loads; the features step refuses to lose it."""
    from dataclasses import replace

    cfg = replace(prepared, feature_storage="numpy_hdf5", feature_dir=str(tmp_path / "fbank"))
    from lhotse import CutSet

    cuts = list(load_cuts(cfg.cuts_path("kespeech", "dev")))
    cuts[1].recording.sources[0].source = str(tmp_path / "gone.wav")
    vanished = tmp_path / "vanished.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(vanished)
    with pytest.raises(RuntimeError, match=cuts[1].id):
        compute_features(cfg, vanished, tmp_path / "fbank" / "x.jsonl.gz", 80)
    assert not (tmp_path / "fbank" / "x.jsonl.gz").exists()


def test_config_is_strict():
    with pytest.raises(KeyError, match="max_duraton"):
        DataConfig.from_dict({"max_duraton": 3.0})
    with pytest.raises(ValueError, match="sampler"):
        DataConfig(sampler="random")
    with pytest.raises(ValueError, match="min_duration"):
        DataConfig(min_duration=25.0)


def test_speed_perturbation_keeps_labels(corpus, tmp_path):
    cfg = _cfg(tmp_path, corpus, speed_perturb=True, speed_factors=[0.9, 1.1])
    prepare_corpus("kespeech", cfg)
    cuts = list(load_cuts(cfg.cuts_path("kespeech", "train")))
    base = {c.id: c for c in cuts if "_sp" not in c.id}
    assert len(cuts) == 3 * len(base)
    for cut in cuts:
        original = base[cut.id.split("_sp")[0]]
        assert cut.supervisions[0].language == original.supervisions[0].language
        assert cut.supervisions[0].text == original.supervisions[0].text
    slow = next(c for c in cuts if c.id.endswith("_sp0.9"))
    assert abs(slow.duration - base[slow.id.split("_sp")[0]].duration / 0.9) < 0.01
    assert len(load_cuts(cfg.cuts_path("kespeech", "test"))) == 36  # dev/test not perturbed


def test_check_step_and_yaml_configs(corpus, tmp_path):
    from hdmole.bin.prepare import main

    main(["check", f"data.corpus_dir={corpus}"])
    (corpus_copy := _copy(corpus, tmp_path))
    (corpus_copy / "KeSpeech/Tasks/ASR/test/text").write_text("broken\n")
    with pytest.raises(SystemExit, match=r"ERROR: .*test/text:1: utterance id 'broken'"):
        main(["check", f"data.corpus_dir={corpus_copy}"])
    root = Path(__file__).resolve().parent.parent / "conf/data"
    for name in ("synthetic.yaml", "synthetic_ci.yaml", "real.yaml"):
        import yaml

        values = {k: v for k, v in yaml.safe_load((root / name).read_text()).items() if k != "defaults"}
        merged = {**yaml.safe_load((root / "synthetic.yaml").read_text()), **values}
        if name == "real.yaml":
            with pytest.raises(ValueError, match="kespeech_dir"):
                DataConfig.from_dict(merged)
            merged.update(kespeech_dir="/K", aishell_dir="/A")
        DataConfig.from_dict(merged, source=name)
