"""Corpus preparation: layout and audio checks -> lhotse recipes -> normalised, filtered cut sets.

    check layout (names the missing file, prints the expected tree)
    -> check listings: UTF-8, Kaldi files line-aligned (KeSpeech), unique ids
    -> check every utterance (KeSpeech: wav path inside the corpus, known accent label,
       transcript present) and every wav (missing, unreadable, empty, multi-channel, NaN/inf:
       error naming file and line, or counted skip with skip_bad; wrong sample rate:
       resampled to 16 kHz and counted); a part left empty is an error
    -> lhotse.recipes.prepare_kespeech / prepare_aishell (not re-implemented) on a clean view
    -> normalise text (hdmole.data.text), filter, keep supervision.language (the accent)
    -> data/cuts/<corpus>_<split>.jsonl.gz + <corpus>_stats.{json,md}; an empty split is an error.

Entry point: `python -m hdmole.bin.prepare cuts|check [hydra overrides]` (run.sh stage 1).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from hdmole.data.accents import LABEL_ALIASES, accent_id
from hdmole.data.config import DataConfig
from hdmole.data.text import normalize_text, unsupported_chars
from hdmole.fileio import atomic_output

log = logging.getLogger(__name__)
SAMPLE_RATE = 16000
KESPEECH_PARTS = ("train_phase1", "train_phase2", "dev_phase1", "dev_phase2", "test")
KESPEECH_KALDI_FILES = ("wav.scp", "text", "utt2subdialect", "utt2spk")
# Our splits -> the corpus' own parts.
SPLITS = {
    "kespeech": {"train": ("train_phase1", "train_phase2"), "dev": ("dev_phase1", "dev_phase2"), "test": ("test",)},
    "aishell": {"train": ("train",), "dev": ("dev",), "test": ("test",)},
}
PART_SPLIT = {corpus: {p: s for s, parts in splits.items() for p in parts} for corpus, splits in SPLITS.items()}
KESPEECH_TREE = """expected KeSpeech layout:
  <kespeech_dir>/
    Audio/...                                  (wav files, 16 kHz)
    Tasks/ASR/<part>/wav.scp                   <utt> Audio/.../<utt>.wav   (relative paths)
    Tasks/ASR/<part>/text                      <utt> <transcript>
    Tasks/ASR/<part>/utt2subdialect            <utt> <Mandarin|Beijing|...>
    Tasks/ASR/<part>/utt2spk                   <utt> <speaker>
  parts: train_phase1 train_phase2 dev_phase1 dev_phase2 test; the four files list the same
  utterances in the same order."""
AISHELL_TREE = """expected AISHELL-1 layout:
  <aishell_dir>/data_aishell/
    transcript/aishell_transcript_v0.8.txt     <utt> <words separated by spaces>
    wav/{train,dev,test}/<SPK>/<utt>.wav        (16 kHz)"""


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (and line) and what is expected."""


@dataclass
class AudioItem:
    utt_id: str
    path: Path
    where: str  # "file:line" that references the audio (for error messages)
    split: str  # our split, for the drop counts


@dataclass
class PrepReport:
    """Kept utterances/hours per split and accent; every dropped item by reason."""

    corpus: str
    kept: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    dropped: Counter = field(default_factory=Counter)  # (split, reason) -> count
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    resampled: int = 0

    def drop(self, split: str, reason: str, what: str) -> None:
        self.dropped[(split, reason)] += 1
        if len(self.examples[reason]) < 5:  # the first few per reason are logged and kept as examples
            self.examples[reason].append(what)
            log.warning("%s/%s: dropped (%s): %s", self.corpus, split, reason, what)

    def dropped_in(self, split: str) -> str:
        """Drop counts of one split ("reason count, ..."), for error messages."""
        return ", ".join(f"{r} {n}" for (s, r), n in sorted(self.dropped.items()) if s == split) or "nothing"

    def keep(self, split: str, accent: str, duration: float) -> None:
        self.kept[split][accent].append(duration)

    def to_json(self) -> dict:
        return {
            "corpus": self.corpus,
            "kept": {s: {a: {"utterances": len(d), "hours": round(sum(d) / 3600, 4)} for a, d in sorted(acc.items())}
                     for s, acc in sorted(self.kept.items())},
            "dropped": [{"split": s, "reason": r, "count": n} for (s, r), n in sorted(self.dropped.items())],
            "dropped_examples": dict(self.examples),
            "resampled_to_16k": self.resampled,
        }

    def to_markdown(self) -> str:
        data = self.to_json()
        lines = [f"# {self.corpus}: prepared cut sets", "", "| split | accent | utterances | hours |", "|---|---|---|---|"]
        for split, accents in data["kept"].items():
            for accent, row in accents.items():
                lines.append(f"| {split} | {accent} | {row['utterances']} | {row['hours']:.3f} |")
            total = sum(r["utterances"] for r in accents.values())
            lines.append(f"| {split} | **all** | {total} | {sum(r['hours'] for r in accents.values()):.3f} |")
        lines += ["", "| split | dropped because | count |", "|---|---|---|"]
        lines += [f"| {d['split']} | {d['reason']} | {d['count']} |" for d in data["dropped"]] or ["| - | nothing dropped | 0 |"]
        lines += ["", f"Resampled to 16 kHz: {self.resampled}"]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Checks


def _require(path: Path, tree: str, what: str = "file") -> None:
    exists = path.is_dir() if what == "directory" else path.is_file()
    if not exists:
        raise CorpusError(f"missing {what}: {path}\n{tree}")


def check_kespeech_layout(corpus_dir: Path, parts: Sequence[str] = KESPEECH_PARTS) -> None:
    _require(corpus_dir, KESPEECH_TREE, "directory")
    for part in parts:
        for name in KESPEECH_KALDI_FILES:
            _require(corpus_dir / "Tasks/ASR" / part / name, KESPEECH_TREE)


def check_aishell_layout(corpus_dir: Path) -> None:
    _require(corpus_dir / "data_aishell/transcript/aishell_transcript_v0.8.txt", AISHELL_TREE)
    for split in ("train", "dev", "test"):
        _require(corpus_dir / "data_aishell/wav" / split, AISHELL_TREE, "directory")


def _listing_lines(path: Path) -> list[str]:
    """Lines of a listing file, split as lhotse's readers split them (LF, CRLF or CR), without
    a UTF-8 BOM. Not UTF-8 (a GBK copy, say) is an error naming the line: lhotse would stop
    with a UnicodeDecodeError naming no file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); listing files must be UTF-8 "
                          f"(convert a GBK file with: iconv -f GBK -t UTF-8)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _kaldi_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, utterance id, value) of a Kaldi-style file; blank lines are skipped."""
    rows = []
    for number, line in enumerate(_listing_lines(path), start=1):
        parts = line.strip().split(maxsplit=1)
        if parts:
            rows.append((number, parts[0], parts[1] if len(parts) > 1 else ""))
    return rows


def check_kaldi_alignment(part_dir: Path) -> dict[str, list[tuple[int, str, str]]]:
    """The four KeSpeech files must list the same ids in the same order (lhotse reads them in
    lockstep); returns their rows by file name. Raises naming the first differing file and line."""
    tables = {name: _kaldi_lines(part_dir / name) for name in KESPEECH_KALDI_FILES}
    reference = tables["wav.scp"]
    for name, rows in tables.items():
        for (_, ref_id, _), (number, utt_id, value) in zip(reference, rows):
            if utt_id != ref_id:
                raise CorpusError(f"{part_dir / name}:{number}: utterance id {utt_id!r} where wav.scp has "
                                  f"{ref_id!r}; the files of {part_dir} must list the same ids in the same order")
            if name in ("wav.scp", "utt2subdialect", "utt2spk") and not value:
                raise CorpusError(f"{part_dir / name}:{number}: no value after utterance id {utt_id!r}")
        if len(rows) != len(reference):
            longer, shorter = (name, "wav.scp") if len(rows) > len(reference) else ("wav.scp", name)
            extra = (rows if len(rows) > len(reference) else reference)[min(len(rows), len(reference))]
            raise CorpusError(f"{part_dir / longer}:{extra[0]}: {longer} has more lines than {shorter} "
                              f"({len(tables[longer])} vs {len(tables[shorter])}); first extra id {extra[1]!r}")
    return tables


def _outside(relative: str) -> bool:
    """A wav.scp path leaving the corpus directory (absolute, or up through ".."); judged on the
    text, not on resolved links, so an Audio/ linked to another disk stays inside."""
    return os.path.isabs(relative) or Path(os.path.normpath(relative)).parts[:1] == ("..",)


def _unknown_accent(label: str) -> str | None:
    """Why `label` is not a known accent (the message of accents.accent_id), else None."""
    try:
        accent_id(label)
    except ValueError as e:
        return str(e)
    return None


class Screen:
    """Per-utterance problems found before lhotse. Bad input is an error naming the file and
    line, or with skip_bad a counted drop; filters (an empty transcript) are always counted
    drops. Rejected ids (`bad`) are left out of the view lhotse reads."""

    def __init__(self, report: PrepReport, skip_bad: bool):
        self.report, self.skip_bad, self.bad = report, skip_bad, set()

    def reject(self, split: str, utt: str, reason: str, message: str, always: bool = False) -> None:
        if not (self.skip_bad or always):
            raise CorpusError(f"{message}; fix it or set data.skip_bad=true to skip and count it")
        self.bad.add(utt)
        self.report.drop(split, reason, message)

    def unique(self, occurrences: Iterable[tuple[str, str, str]]) -> None:
        """(id, where, split) per listed utterance. Every copy of a repeated id is rejected: which
        one is right is unknown, lhotse asserts on repeats within a part, and across parts the id
        would be in two splits while results are keyed by it."""
        places = defaultdict(list)
        for utt, where, split in occurrences:
            places[utt].append((where, split))
        for utt, copies in places.items():
            if len(copies) > 1:
                shown = ", ".join(where for where, _ in copies[:3]) + (", ..." if len(copies) > 3 else "")
                for _, split in copies:
                    self.reject(split, utt, "duplicate_id", f"utterance id {utt!r} listed {len(copies)} times: {shown}")


def audio_problem(path: Path) -> tuple[str | None, int]:
    """(None, sample rate) if the wav is usable, else (reason, 0): "missing_audio",
    "corrupt_audio" (unreadable), "empty_audio" (no samples), "multichannel_audio" (lhotse's
    KeSpeech recipe and the features read one channel), "nonfinite_audio" (NaN/inf samples,
    possible only in float wavs: one makes every loss it touches NaN)."""
    import numpy as np
    import soundfile as sf

    if not path.is_file():
        return "missing_audio", 0
    try:  # soundfile raises several types for unreadable files
        info = sf.info(str(path))
        if info.frames == 0:
            return "empty_audio", 0
        if info.channels != 1:
            return "multichannel_audio", 0
        if info.subtype in ("FLOAT", "DOUBLE") and not all(
                np.isfinite(block).all() for block in sf.blocks(str(path), blocksize=1 << 20, dtype="float32")):
            return "nonfinite_audio", 0
    except Exception:
        return "corrupt_audio", 0
    return None, int(info.samplerate)


def check_audio(items: Iterable[AudioItem], screen: Screen, num_jobs: int) -> set[str]:
    """Opens every wav not rejected yet and rejects the bad ones; returns the ids needing resampling."""
    from concurrent.futures import ThreadPoolExecutor

    items = [item for item in items if item.utt_id not in screen.bad]
    with ThreadPoolExecutor(max(1, num_jobs)) as pool:
        problems = list(pool.map(lambda it: audio_problem(it.path), items))
    resample = set()
    for item, (problem, sample_rate) in zip(items, problems):
        if problem is not None:
            screen.reject(item.split, item.utt_id, problem,
                          f"{problem.replace('_', ' ')}: {item.path} (referenced at {item.where})")
        elif sample_rate != SAMPLE_RATE:
            resample.add(item.utt_id)
    return resample


# ----------------------------------------------------------------------------------------
# Per-corpus preparation: checks + the clean view lhotse reads.


@dataclass
class Checked:
    """Result of a corpus check: what lhotse must not see, what needs resampling."""

    root: Path
    items: list[AudioItem]
    bad: set[str]
    resample: set[str]
    parts: dict[str, list[str]]  # corpus part -> listed utterance ids (bad ones included)
    extra: dict = field(default_factory=dict)  # corpus-specific details for the clean view

    def fingerprint(self, files: Iterable[Path]) -> str:
        """Changes whenever a listing file, an audio file (size, mtime) or the bad set changes."""
        digest = hashlib.sha256(f"{self.root.resolve()}|{sorted(self.bad)}".encode())
        for path in files:
            digest.update(str(path).encode() + path.read_bytes())
        for item in self.items:
            st = item.path.stat() if item.path.is_file() else None
            digest.update(f"{item.utt_id}|{item.path}|{st and (st.st_size, st.st_mtime_ns)}".encode())
        return digest.hexdigest()

    def empty_part(self) -> str | None:
        """The first part with no utterance left: lhotse would stop on it with a bare assertion
        ("No recordings left after fixing the manifests")."""
        return next((part for part, utts in self.parts.items() if all(u in self.bad for u in utts)), None)


def check_kespeech(cfg: DataConfig, report: PrepReport) -> Checked:
    """Layout, line alignment of the Kaldi files, unique ids, wav paths inside the corpus,
    known accent labels, a transcript per line, every wav."""
    root = cfg.kespeech_root
    check_kespeech_layout(root)
    tables = {part: check_kaldi_alignment(root / "Tasks/ASR" / part) for part in KESPEECH_PARTS}
    split_of = PART_SPLIT["kespeech"]

    def where(part: str, name: str, number: int) -> str:
        return f"{root / 'Tasks/ASR' / part / name}:{number}"

    screen = Screen(report, cfg.skip_bad)
    screen.unique((utt, where(part, "wav.scp", n), split_of[part])
                  for part, t in tables.items() for n, utt, _ in t["wav.scp"])
    items = []
    for part, t in tables.items():
        split = split_of[part]
        for (n, utt, rel), (text_n, _, text), (label_n, _, label) in zip(t["wav.scp"], t["text"], t["utt2subdialect"]):
            if utt in screen.bad:
                continue
            if _outside(rel):
                screen.reject(split, utt, "path_outside_corpus", f"{where(part, 'wav.scp', n)}: wav path {rel!r} "
                              f"of {utt!r} leaves {root} (wav.scp paths are relative to the corpus root)")
            elif problem := _unknown_accent(label):
                screen.reject(split, utt, "unknown_accent",
                              f"{where(part, 'utt2subdialect', label_n)}: {utt!r}: {problem}")
            elif not text:  # lhotse's recipe fails on a line without transcript
                screen.reject(split, utt, "empty_text", f"{where(part, 'text', text_n)}: no transcript for {utt!r}",
                              always=True)
            else:
                items.append(AudioItem(utt, root / rel, where(part, "wav.scp", n), split))
    resample = check_audio(items, screen, cfg.num_jobs)
    parts = {part: [utt for _, utt, _ in t["wav.scp"]] for part, t in tables.items()}
    return Checked(root, items, screen.bad, resample, parts, {"tables": tables})


def check_aishell(cfg: DataConfig, report: PrepReport) -> Checked:
    """Layout, unique ids (transcript lines, wav names), transcript lines against wav files
    (both directions), every wav."""
    root = cfg.aishell_root
    check_aishell_layout(root)
    transcript = root / "data_aishell/transcript/aishell_transcript_v0.8.txt"
    rows = _kaldi_lines(transcript)
    wav_root = root / "data_aishell/wav"
    found = [(p.stem, p, split) for split in ("train", "dev", "test")
             for p in sorted((wav_root / split).rglob("*.wav"))]
    wavs = {utt: path for utt, path, _ in found}
    split_of = {utt: split for utt, _, split in found}
    screen = Screen(report, cfg.skip_bad)
    # lhotse keys transcripts by id (the last copy wins) and recordings by file name (asserts on repeats).
    screen.unique((utt, f"{transcript}:{n}", split_of.get(utt, "unknown")) for n, utt, _ in rows)
    screen.unique((utt, str(path), split) for utt, path, split in found)
    listed = {utt for _, utt, _ in rows}
    # lhotse silently skips wavs without transcript and transcript lines without wav: count both.
    for utt in sorted(set(wavs) - listed - screen.bad):
        screen.reject(split_of[utt], utt, "no_transcript", f"{wavs[utt]} has no line in {transcript}", always=True)
    items = [AudioItem(utt, wavs.get(utt, wav_root / "<split>/<SPK>" / f"{utt}.wav"), f"{transcript}:{n}",
                       split_of.get(utt, "unknown")) for n, utt, _ in rows]
    resample = check_audio(items, screen, cfg.num_jobs)
    parts = {split: [utt for utt, _, s in found if s == split and utt in listed] for split in ("train", "dev", "test")}
    return Checked(root, items, screen.bad, resample, parts, {"transcript": transcript, "rows": rows, "wavs": wavs})


def _kespeech_clean_view(cfg: DataConfig, checked: Checked) -> Path:
    """Copy of the Kaldi files without the bad utterances (absolute wav paths; UTF-8, LF, no
    blank lines)."""
    view = Path(cfg.manifest_dir).resolve() / "kespeech_clean"
    shutil.rmtree(view, ignore_errors=True)
    for part, tables in checked.extra["tables"].items():
        out_dir = view / "Tasks/ASR" / part
        out_dir.mkdir(parents=True)
        for name, rows in tables.items():
            (out_dir / name).write_text("".join(
                f"{utt} {(checked.root / value).absolute() if name == 'wav.scp' else value}\n"
                for _, utt, value in rows if utt not in checked.bad), encoding="utf-8")
    return view


def _aishell_clean_view(cfg: DataConfig, checked: Checked) -> Path:
    """Transcript without the bad utterances + symlinks to the good wavs (resolved back later)."""
    view = Path(cfg.manifest_dir).resolve() / "aishell_clean"
    shutil.rmtree(view, ignore_errors=True)
    transcript = checked.extra["transcript"]
    (view / "data_aishell/transcript").mkdir(parents=True)
    (view / "data_aishell/transcript" / transcript.name).write_text(
        "".join(f"{u} {t}\n" for _, u, t in checked.extra["rows"] if u not in checked.bad), encoding="utf-8")
    wav_root = checked.root / "data_aishell/wav"
    for utt, path in checked.extra["wavs"].items():
        if utt not in checked.bad:
            link = view / "data_aishell/wav" / path.relative_to(wav_root)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return view


def _run_prepare_kespeech(corpus_dir: Path, cfg: DataConfig) -> dict:
    from lhotse.recipes import prepare_kespeech

    return prepare_kespeech(corpus_dir, cfg.manifest_dir, dataset_parts=KESPEECH_PARTS, num_jobs=cfg.num_jobs)


def _run_prepare_aishell(corpus_dir: Path, cfg: DataConfig) -> dict:
    from lhotse.recipes import prepare_aishell

    return prepare_aishell(corpus_dir, cfg.manifest_dir)


@dataclass(frozen=True)
class CorpusRecipe:
    """How one corpus is checked and handed to its lhotse recipe."""

    check: Callable[[DataConfig, PrepReport], Checked]
    clean_view: Callable[[DataConfig, Checked], Path]
    run_lhotse: Callable[[Path, DataConfig], dict]
    manifest_prefix: str
    listing_files: Callable[[Path], list[Path]]


CORPORA: dict[str, CorpusRecipe] = {
    "kespeech": CorpusRecipe(check_kespeech, _kespeech_clean_view, _run_prepare_kespeech, "kespeech-asr",
                             lambda root: [root / "Tasks/ASR" / p / n for p in KESPEECH_PARTS
                                           for n in KESPEECH_KALDI_FILES]),
    "aishell": CorpusRecipe(check_aishell, _aishell_clean_view, _run_prepare_aishell, "aishell",
                            lambda root: [root / "data_aishell/transcript/aishell_transcript_v0.8.txt"]),
}


def _fresh_manifests(manifest_dir: Path, prefix: str, fingerprint: str) -> None:
    """lhotse reuses existing manifests; drop them when the corpus changed (stale-manifest bug)."""
    manifest_dir.mkdir(parents=True, exist_ok=True)
    marker = manifest_dir / f".{prefix}.fingerprint"
    if marker.exists() and marker.read_text().strip() == fingerprint:
        return
    for old in manifest_dir.glob(f"{prefix}_*.jsonl.gz"):
        old.unlink()
    marker.write_text(fingerprint + "\n")


def _no_utterance_left(report: PrepReport, what: str, split: str, cfg: DataConfig | None = None) -> None:
    """Raise for a part or split left empty; with cfg the stats report is written first and named."""
    message = f"{report.corpus} {what}: no utterance left (dropped in {split}: {report.dropped_in(split)})"
    if cfg is not None:
        _write_stats(report, cfg)
        message += f"; see the drop counts in {Path(cfg.cuts_dir) / f'{report.corpus}_stats.md'}"
    raise CorpusError(message)


def _check(corpus: str, cfg: DataConfig, report: PrepReport, write_stats: bool) -> Checked:
    """All checks of one corpus, then every part must keep an utterance."""
    checked = CORPORA[corpus].check(cfg, report)
    report.resampled = len(checked.resample)
    part = checked.empty_part()
    if part is not None:
        _no_utterance_left(report, f"part {part!r}", PART_SPLIT[corpus][part], cfg if write_stats else None)
    return checked


def check_corpus(corpus: str, cfg: DataConfig) -> PrepReport:
    """Only the checks (layout, listings, audio), without writing anything: the standalone
    pre-check of a real corpus (`python -m hdmole.bin.prepare check`); run.sh checks the
    layout in stage 0 and everything in stage 1."""
    report = PrepReport(corpus)
    _check(corpus, cfg, report, write_stats=False)
    return report


# ----------------------------------------------------------------------------------------
# Cuts: normalise, filter, write.


def _real_path(source: str, relative: bool) -> str:
    """The real file behind a (possibly symlinked, clean-view) path; relative to the working
    directory when the corpus root was given relative (a checkout copied elsewhere still works)."""
    real = os.path.realpath(source)
    return os.path.relpath(real) if relative else real


def _recording(recording, resample: bool, relative: bool):
    """Recording pointing at the real file; with resample, built from the file's true sample rate
    (lhotse's KeSpeech recipe assumes 16 kHz) and resampled to 16 kHz."""
    from lhotse import Recording
    from lhotse.utils import fastcopy

    if resample:
        true = Recording.from_file(_real_path(recording.sources[0].source, relative), recording_id=recording.id)
        return true.resample(SAMPLE_RATE)
    sources = [fastcopy(s, source=_real_path(s.source, relative)) if s.type == "file" else s
               for s in recording.sources]
    return fastcopy(recording, sources=sources)


def filter_cuts(cuts, cfg: DataConfig, split: str, report: PrepReport):
    """Normalise supervision text and drop (counting by reason) what the model cannot use."""
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    kept = []
    for cut in cuts:
        if len(cut.supervisions) != 1:
            report.drop(split, "not_one_supervision", cut.id)
            continue
        sup = cut.supervisions[0]
        text = normalize_text(sup.text or "", cfg.traditional_to_simplified)
        reason = None
        if not text:
            reason = "empty_text"
        elif unsupported_chars(text):
            reason = "unsupported_chars"
        elif len(text) > cfg.max_chars:
            reason = "too_many_chars"
        elif cut.duration < cfg.min_duration:
            reason = "too_short"
        elif cut.duration > cfg.encoder_max_duration:
            reason = "longer_than_encoder_max"
        elif split == "train" and cut.duration > cfg.max_duration:
            reason = "too_long_for_training"
        if reason:
            detail = f"{sup.id} ({cut.duration:.2f} s): {sup.text!r}"
            if reason == "unsupported_chars":
                detail += f" has {''.join(unsupported_chars(text))!r}"
            report.drop(split, reason, detail)
            continue
        # Cut id = utterance id (results are keyed by it); language (the accent) and speaker unchanged.
        kept.append(fastcopy(cut, id=sup.id, supervisions=[fastcopy(sup, text=text)]))
    return CutSet.from_cuts(kept)


def _write_cuts(cuts, path: Path) -> None:
    with atomic_output(path) as tmp:  # the temporary keeps the .jsonl.gz suffix lhotse dispatches on
        cuts.to_file(tmp)


def prepare_corpus(corpus: str, cfg: DataConfig) -> PrepReport:
    """Prepare one corpus ("kespeech" or "aishell") into cfg.cuts_dir; returns the stats report."""
    from lhotse import CutSet, RecordingSet

    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    report = PrepReport(corpus)
    recipe = CORPORA[corpus]
    checked = _check(corpus, cfg, report, write_stats=True)
    resample = checked.resample
    # lhotse always reads the clean view: it trips over what the checks tolerate (a BOM, blank
    # lines) as well as over what they reject.
    corpus_dir = recipe.clean_view(cfg, checked)
    _fresh_manifests(Path(cfg.manifest_dir), recipe.manifest_prefix,
                     checked.fingerprint(recipe.listing_files(checked.root)))
    manifests = recipe.run_lhotse(corpus_dir, cfg)
    relative = not checked.root.is_absolute()
    for split, parts in SPLITS[corpus].items():
        pieces = []
        for part in parts:
            if part not in manifests:
                raise CorpusError(f"{corpus}: lhotse produced no manifests for part {part!r} (see log)")
            recordings = RecordingSet.from_recordings(
                _recording(r, r.id in resample, relative) for r in manifests[part]["recordings"])
            pieces.append(CutSet.from_manifests(recordings=recordings, supervisions=manifests[part]["supervisions"]))
        cuts = filter_cuts(CutSet.from_cuts(c for piece in pieces for c in piece), cfg, split, report)
        if len(cuts) == 0:
            _no_utterance_left(report, split, split, cfg)
        for cut in cuts:
            report.keep(split, LABEL_ALIASES.get(cut.supervisions[0].language, cut.supervisions[0].language),
                        cut.duration)
        if split == "train" and cfg.speed_perturb:
            cuts = CutSet.from_cuts(c for f in [1.0, *cfg.speed_factors]
                                    for c in (cuts if f == 1.0 else cuts.perturb_speed(f)))
        _write_cuts(cuts, cfg.cuts_path(corpus, split))
        _write_stats(report, cfg)  # also after each split, so a later failure still leaves the counts
    log.info("%s prepared:\n%s", corpus, report.to_markdown())
    return report


def _write_stats(report: PrepReport, cfg: DataConfig) -> None:
    out = Path(cfg.cuts_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{report.corpus}_stats.json").write_text(json.dumps(report.to_json(), ensure_ascii=False, indent=1) + "\n",
                                                     encoding="utf-8")
    (out / f"{report.corpus}_stats.md").write_text(report.to_markdown(), encoding="utf-8")


def prepare(cfg: DataConfig, corpora: Sequence[str] = ("aishell", "kespeech")) -> dict[str, PrepReport]:
    return {corpus: prepare_corpus(corpus, cfg) for corpus in corpora}
