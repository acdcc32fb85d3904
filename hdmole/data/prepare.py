"""Corpus preparation: layout and audio checks -> lhotse recipes -> normalised, filtered cut sets.

    check layout (names the missing file, prints the expected tree)
    -> check Kaldi files are line-aligned (KeSpeech) / transcript parses (AISHELL)
    -> check every wav (missing, unreadable, empty: error, or counted skip with skip_bad;
       wrong sample rate: resampled to 16 kHz and counted)
    -> lhotse.recipes.prepare_kespeech / prepare_aishell (not re-implemented)
    -> normalise text (hdmole.data.text), filter, keep supervision.language (the accent)
    -> data/cuts/<corpus>_<split>.jsonl.gz + <corpus>_stats.{json,md}; an empty split is an error.

CLI (run.sh stage 1):  python -m hdmole.data.prepare --corpus all [--config conf/data/x.yaml]
                                          [--set key=value ...] [--check-only]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from hdmole.data.accents import LABEL_ALIASES
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


def _kaldi_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, utterance id, value) of a Kaldi-style file; malformed lines are errors."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        rows.append((number, parts[0], parts[1] if len(parts) > 1 else ""))
    return rows


def check_kaldi_alignment(part_dir: Path) -> list[tuple[int, str, str]]:
    """The four KeSpeech files must list the same ids in the same order (lhotse reads them in
    lockstep); returns wav.scp's rows. Raises naming the first differing file and line."""
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
    return reference


def audio_problem(path: Path) -> tuple[str | None, int]:
    """(None, sample rate) if the wav is usable, else (reason, 0): "missing_audio",
    "corrupt_audio" (unreadable) or "empty_audio" (no samples)."""
    import soundfile as sf

    if not path.is_file():
        return "missing_audio", 0
    try:
        info = sf.info(str(path))
    except Exception:  # soundfile raises several types for unreadable files
        return "corrupt_audio", 0
    return ("empty_audio", 0) if info.frames == 0 else (None, int(info.samplerate))


def check_audio(items: Iterable[AudioItem], skip_bad: bool, report: PrepReport, split_of: Callable[[str], str],
                num_jobs: int) -> tuple[set[str], set[str]]:
    """Returns (bad utterance ids, ids needing resampling); raises on the first bad file unless skip_bad."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    with ThreadPoolExecutor(max(1, num_jobs)) as pool:
        problems = list(pool.map(lambda it: audio_problem(it.path), items))
    bad, resample = set(), set()
    for item, (problem, sample_rate) in zip(items, problems):
        if problem is None:
            if sample_rate != SAMPLE_RATE:
                resample.add(item.utt_id)
            continue
        message = f"{problem.replace('_', ' ')}: {item.path} (referenced at {item.where})"
        if not skip_bad:
            raise CorpusError(message + "; fix the file or set data.skip_bad=true to skip and count it")
        bad.add(item.utt_id)
        report.drop(split_of(item.utt_id), problem, message)
    return bad, resample


# ----------------------------------------------------------------------------------------
# Per-corpus preparation: checks + a clean view for lhotse where items must be skipped.


@dataclass
class Checked:
    """Result of a corpus check: what lhotse must not see, what needs resampling."""

    root: Path
    items: list[AudioItem]
    bad: set[str]
    resample: set[str]
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


def check_kespeech(cfg: DataConfig, report: PrepReport) -> Checked:
    """Layout, line alignment of the Kaldi files, every wav."""
    root = cfg.kespeech_root
    check_kespeech_layout(root)
    rows_by_part = {part: check_kaldi_alignment(root / "Tasks/ASR" / part) for part in KESPEECH_PARTS}
    split_of_part = {p: s for s, parts in SPLITS["kespeech"].items() for p in parts}
    utt_split = {utt: split_of_part[part] for part, rows in rows_by_part.items() for _, utt, _ in rows}
    items = [AudioItem(utt, root / rel, f"{root / 'Tasks/ASR' / part / 'wav.scp'}:{n}")
             for part, rows in rows_by_part.items() for n, utt, rel in rows]
    bad, resample = check_audio(items, cfg.skip_bad, report, utt_split.__getitem__, cfg.num_jobs)
    return Checked(root, items, bad, resample)


def check_aishell(cfg: DataConfig, report: PrepReport) -> Checked:
    """Layout, transcript lines against wav files (both directions), every wav."""
    root = cfg.aishell_root
    check_aishell_layout(root)
    transcript = root / "data_aishell/transcript/aishell_transcript_v0.8.txt"
    rows = _kaldi_lines(transcript)
    listed = {utt for _, utt, _ in rows}
    wav_root = root / "data_aishell/wav"
    wavs = {p.stem: p for split in ("train", "dev", "test") for p in sorted((wav_root / split).rglob("*.wav"))}
    split_of = {utt: p.relative_to(wav_root).parts[0] for utt, p in wavs.items()}
    # lhotse silently skips wavs without transcript and transcript lines without wav: count both.
    for utt in sorted(set(wavs) - listed):
        report.drop(split_of[utt], "no_transcript", f"{wavs[utt]} has no line in {transcript}")
    items = [AudioItem(utt, wavs.get(utt, wav_root / "<split>/<SPK>" / f"{utt}.wav"), f"{transcript}:{n}")
             for n, utt, _ in rows]
    bad, resample = check_audio(items, cfg.skip_bad, report, lambda u: split_of.get(u, "unknown"), cfg.num_jobs)
    return Checked(root, items, bad, resample, {"transcript": transcript, "rows": rows, "wavs": wavs})


def _kespeech_clean_view(cfg: DataConfig, checked: Checked) -> Path:
    """Copy of the Kaldi files without the bad utterances (absolute wav paths)."""
    view = Path(cfg.manifest_dir).resolve() / "kespeech_clean"
    shutil.rmtree(view, ignore_errors=True)
    for part in KESPEECH_PARTS:
        out_dir = view / "Tasks/ASR" / part
        out_dir.mkdir(parents=True)
        for name in KESPEECH_KALDI_FILES:
            rows = _kaldi_lines(checked.root / "Tasks/ASR" / part / name)
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


def check_corpus(corpus: str, cfg: DataConfig) -> PrepReport:
    """Only the checks (layout, alignment, audio), without writing anything: the standalone
    pre-check of a real corpus (local/check_corpus.py, `--check-only`); run.sh checks the
    layout in stage 0 and everything in stage 1."""
    report = PrepReport(corpus)
    checked = CORPORA[corpus].check(cfg, report)
    report.resampled = len(checked.resample)
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
    checked = recipe.check(cfg, report)
    resample = checked.resample
    report.resampled = len(resample)
    corpus_dir = recipe.clean_view(cfg, checked) if checked.bad else checked.root
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
            raise CorpusError(f"{corpus} {split}: no utterance left (parts {', '.join(parts)}); "
                              f"see the drop counts in {Path(cfg.cuts_dir) / f'{corpus}_stats.md'}")
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


def main(argv: Sequence[str] | None = None) -> None:
    import yaml

    parser = argparse.ArgumentParser(description="Prepare KeSpeech/AISHELL cut sets (see docs/data.md)")
    parser.add_argument("--corpus", choices=[*CORPORA, "all"], default="all")
    parser.add_argument("--config", help="a conf/data/*.yaml file (DataConfig fields)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DataConfig overrides (YAML values)")
    parser.add_argument("--check-only", action="store_true", help="only check layout, Kaldi files and audio")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = {}
    if args.config:
        text = Path(args.config).read_text(encoding="utf-8")
        values = {k: v for k, v in (yaml.safe_load(text) or {}).items()}
    for item in args.set:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    cfg = DataConfig.from_dict(values, source=args.config or "--set")
    corpora = list(CORPORA) if args.corpus == "all" else [args.corpus]
    if args.check_only:
        for corpus in corpora:
            report = check_corpus(corpus, cfg)
            log.info("%s: checks passed; %d audio problems skipped, %d files to resample",
                     corpus, sum(report.dropped.values()), report.resampled)
        return
    prepare(cfg, corpora)


if __name__ == "__main__":
    main()
