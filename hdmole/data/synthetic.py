"""Synthetic multi-accent Mandarin corpus in the on-disk layouts of AISHELL-1 and KeSpeech.

    <out>/aishell/data_aishell/transcript/aishell_transcript_v0.8.txt
    <out>/aishell/data_aishell/wav/{train,dev,test}/<SPK>/<UTT>.wav          source: standard Mandarin
    <out>/KeSpeech/Tasks/ASR/<part>/{wav.scp,text,utt2subdialect,utt2spk}    target: 9 accents
    <out>/KeSpeech/Audio/<SPK>/<part>/<UTT>.wav
    <out>/README.md, LICENCE.md, inventory.txt, synthetic_manifest.json (written last = done marker)

Everything is planned up front in one process from `seed` (numpy generators, never `hash()`),
then rendered by `nj` worker processes; each utterance depends only on its own plan entry, so
the same seed gives byte-identical files for any `nj`. Files are written to a temporary name and
renamed; a rerun with the same plan skips existing files (resume after interruption) and a
finished corpus is recognised by its manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from hdmole.data.accent_rules import (
    ACCENT_RULES,
    ACCENT_STYLES,
    SOURCE_STYLE,
    AccentStyle,
    rule_table_markdown,
    style_table_markdown,
)
from hdmole.data.accents import ACCENTS
from hdmole.data.sentences import (
    Sentence,
    candidate_sentences,
    select_inventory,
    sentence_text,
)
from hdmole.data.speech import SAMPLE_RATE, VOICE_VARIANTS, Espeak, Voice, apply_channel
from hdmole.fileio import atomic_output, write_text_atomic

log = logging.getLogger(__name__)

CORPUS_VERSION = "hdmole-synth-1"
MANIFEST_NAME = "synthetic_manifest.json"
KESPEECH_TRAIN_PARTS = ("train_phase1", "train_phase2")
KESPEECH_DEV_PARTS = ("dev_phase1", "dev_phase2")


@dataclass(frozen=True)
class SyntheticSize:
    """Corpus size. `*_utts` are utterance counts; accent counts are per accent (9 accents)."""

    inventory_size: int
    max_homophones: int
    generated_sentences: int  # template sentences added to the HSK ones
    dev_texts: int
    test_texts: int
    min_char_count: int  # dev/test sentences only use characters seen this often in source train
    source_train_utts: int
    source_dev_utts: int
    source_test_utts: int
    source_speakers: tuple[int, int, int]  # train, dev, test
    accent_train_utts: int
    accent_dev_utts: int
    accent_test_utts: int
    accent_speakers: tuple[int, int, int]


SIZES: dict[str, SyntheticSize] = {
    "ci": SyntheticSize(300, 2, 300, 20, 30, 0, 60, 10, 16, (6, 2, 2), 8, 2, 4, (2, 2, 1)),
    "default": SyntheticSize(300, 2, 8000, 300, 600, 50, 12000, 300, 600, (60, 6, 10), 500, 60, 120, (8, 2, 4)),
    "large": SyntheticSize(300, 2, 20000, 600, 1000, 100, 30000, 600, 1000, (150, 10, 20), 2000, 100, 200, (24, 4, 8)),
}


@dataclass(frozen=True)
class UttPlan:
    """Everything needed to render one utterance (and nothing else: renders are independent)."""

    utt_id: str
    corpus: str  # "aishell" | "kespeech"
    part: str  # aishell split or KeSpeech part
    accent: str
    speaker: str
    words: tuple[str, ...]  # Hanzi words (the transcript)
    pinyin: str  # what is spoken: numbered pinyin after the accent rules
    voice: Voice
    channel: str
    snr_db: float
    gain_dbfs: float
    noise_seed: int
    rel_path: str  # relative to the output root

    @property
    def text(self) -> str:
        return "".join(self.words)


def _speakers(rng: np.random.Generator, ids: list[str], style: AccentStyle) -> dict[str, Voice]:
    voices = {}
    variants = rng.permutation(len(VOICE_VARIANTS))
    for i, spk in enumerate(ids):
        voices[spk] = Voice(
            variant=VOICE_VARIANTS[int(variants[i % len(variants)])],
            pitch=int(np.clip(rng.integers(30, 71) + style.pitch_offset, 0, 100)),
            pitch_range=int(np.clip(rng.integers(30, 91) * style.range_scale, 0, 100)),
            rate=int(rng.integers(150, 201) * style.rate_scale),
        )
    return voices


def _utterance(rng: np.random.Generator, utt_id: str, corpus: str, part: str, accent: str, speaker: str,
               voice: Voice, style: AccentStyle, sentence: Sentence, rel_path: str) -> UttPlan:
    rules = ACCENT_RULES[accent] if corpus == "kespeech" else ACCENT_RULES["Mandarin"]
    spoken = rules.words([list(syl) for _, syl in sentence])
    jitter = Voice(voice.variant, int(np.clip(voice.pitch + rng.integers(-3, 4), 0, 100)), voice.pitch_range,
                   int(voice.rate * rng.uniform(0.94, 1.06)))
    return UttPlan(
        utt_id=utt_id, corpus=corpus, part=part, accent=accent, speaker=speaker,
        words=tuple(w for w, _ in sentence), pinyin=" ".join(s for w in spoken for s in w), voice=jitter,
        channel=style.channel, snr_db=round(float(style.snr_db + rng.uniform(-3, 3)), 2),
        gain_dbfs=round(float(rng.uniform(-6, -1)), 2), noise_seed=int(rng.integers(2**31)), rel_path=rel_path,
    )


@dataclass
class CorpusPlan:
    size_name: str
    seed: int
    inventory: tuple[str, ...]
    utterances: list[UttPlan]
    text_stats: dict

    def digest(self) -> str:
        payload = json.dumps([CORPUS_VERSION, self.size_name, self.seed, [asdict(u) for u in self.utterances]],
                             ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def plan_corpus(size_name: str, seed: int) -> CorpusPlan:
    """Choose texts, speakers, accents and effects for every utterance (single process)."""
    if size_name not in SIZES:
        raise ValueError(f"unknown corpus size {size_name!r}; known: {', '.join(SIZES)}")
    size = SIZES[size_name]
    rng = np.random.default_rng([seed, 1])
    inventory = select_inventory(size.inventory_size, size.max_homophones)
    sentences = candidate_sentences(inventory, size.generated_sentences, seed)
    order = rng.permutation(len(sentences))
    held_out = [sentences[i] for i in order[: size.dev_texts + size.test_texts]]
    train_texts = [sentences[i] for i in order[size.dev_texts + size.test_texts:]]

    # Source train: cycle through the shuffled train sentences so each is used about equally.
    source_train = [train_texts[i % len(train_texts)] for i in range(size.source_train_utts)]
    char_counts = Counter(ch for s in source_train for ch in sentence_text(s))
    # Dev/test sentences: only characters the source training data shows often enough.
    well_covered = [s for s in held_out if all(char_counts[ch] >= size.min_char_count for ch in sentence_text(s))]
    dev_texts, test_texts = well_covered[: size.dev_texts], well_covered[size.dev_texts:]
    if not dev_texts or not test_texts:
        raise RuntimeError("no dev/test sentences left after the character-coverage filter")

    utts: list[UttPlan] = []

    def pick(pool: list[Sentence], n: int) -> list[Sentence]:
        """n sentences cycling through a shuffled pool (each used about equally often)."""
        perm = rng.permutation(len(pool))
        return [pool[int(perm[i % len(pool)])] for i in range(n)]

    # Source domain, AISHELL layout: speaker S0001.., utterance SYN001S0001W0001.
    spk_counter = 0
    for split, n_utts, n_spk, texts in (
        ("train", size.source_train_utts, size.source_speakers[0], source_train),
        ("dev", size.source_dev_utts, size.source_speakers[1], pick(dev_texts, size.source_dev_utts)),
        ("test", size.source_test_utts, size.source_speakers[2], pick(test_texts, size.source_test_utts)),
    ):
        ids = [f"S{spk_counter + k + 1:04d}" for k in range(n_spk)]
        spk_counter += n_spk
        voices = _speakers(rng, ids, SOURCE_STYLE)
        for i, sentence in enumerate(texts):
            spk = ids[i % n_spk]
            utt = f"SYN001{spk}W{i // n_spk + 1:04d}"
            utts.append(_utterance(rng, utt, "aishell", split, "Mandarin", spk, voices[spk], SOURCE_STYLE, sentence,
                                   f"aishell/data_aishell/wav/{split}/{spk}/{utt}.wav"))

    # Target domain, KeSpeech layout; speakers of train, dev and test are disjoint.
    for a_idx, accent in enumerate(ACCENTS):
        style = ACCENT_STYLES[accent]
        for split, n_utts, n_spk, pool, parts in (
            ("train", size.accent_train_utts, size.accent_speakers[0], train_texts, KESPEECH_TRAIN_PARTS),
            ("dev", size.accent_dev_utts, size.accent_speakers[1], dev_texts, KESPEECH_DEV_PARTS),
            ("test", size.accent_test_utts, size.accent_speakers[2], test_texts, ("test",)),
        ):
            ids = [f"K{a_idx}{split[:2].upper()}{k + 1:03d}" for k in range(n_spk)]
            voices = _speakers(rng, ids, style)
            for i, sentence in enumerate(pick(pool, n_utts)):
                k = i % n_spk
                spk, part = ids[k], parts[k % len(parts)]  # speakers alternate between phases
                utt = f"{spk}_{i // n_spk + 1:05d}"
                utts.append(_utterance(rng, utt, "kespeech", part, accent, spk, voices[spk], style, sentence,
                                       f"KeSpeech/Audio/{spk}/{part}/{utt}.wav"))

    train_chars = np.array([char_counts[ch] for ch in inventory])
    text_stats = {
        "inventory_size": len(inventory),
        "candidate_sentences": len(sentences),
        "train_sentences": len(train_texts),
        "dev_sentences": len(dev_texts),
        "test_sentences": len(test_texts),
        "held_out_dropped_for_rare_chars": len(held_out) - len(well_covered),
        "source_train_char_count_min": int(train_chars.min()),
        "source_train_char_count_median": float(np.median(train_chars)),
        "source_train_chars_below_100": int((train_chars < 100).sum()),
        "source_train_characters": int(sum(char_counts.values())),
    }
    return CorpusPlan(size_name, seed, inventory, utts, text_stats)


BLOCK_SIZE = 64  # utterances rendered in sequence from a freshly loaded espeak-ng


def render_block(block: list[UttPlan], root: str) -> list[tuple[str, int]]:
    """Synthesize a block of consecutive plan entries (atomic writes); returns (utt_id, samples).

    espeak-ng's state after an utterance depends on the ones before it, so a block always starts
    from a fresh engine and is rendered whole and in order; a block whose files all exist (an
    interrupted run) is skipped, a partial one is rendered again (identical bytes).
    """
    import soundfile as sf

    paths = [Path(root) / plan.rel_path for plan in block]
    if all(path.exists() for path in paths):
        return [(plan.utt_id, sf.info(str(path)).frames) for plan, path in zip(block, paths)]
    engine = Espeak.fresh()
    out = []
    for plan, path in zip(block, paths):
        engine.seed(plan.noise_seed)
        audio = engine.synthesize(plan.pinyin, plan.voice)
        audio = apply_channel(audio, plan.channel, plan.snr_db, plan.gain_dbfs, plan.noise_seed)
        with atomic_output(path) as tmp:
            sf.write(str(tmp), np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        out.append((plan.utt_id, int(audio.shape[0])))
    return out


def _render_star(args: tuple[list[UttPlan], str]) -> list[tuple[str, int]]:
    return render_block(*args)


def _write_layouts(out: Path, utts: list[UttPlan]) -> None:
    aishell = sorted((u for u in utts if u.corpus == "aishell"), key=lambda u: u.utt_id)
    write_text_atomic(out / "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt",
                      "".join(f"{u.utt_id} {' '.join(u.words)}\n" for u in aishell))
    by_part: dict[str, list[UttPlan]] = {}
    for u in utts:
        if u.corpus == "kespeech":
            by_part.setdefault(u.part, []).append(u)
    for part, items in by_part.items():
        items.sort(key=lambda u: u.utt_id)
        d = out / "KeSpeech/Tasks/ASR" / part
        rel = lambda u: u.rel_path.removeprefix("KeSpeech/")  # noqa: E731 - paths relative to the corpus dir
        write_text_atomic(d / "wav.scp", "".join(f"{u.utt_id} {rel(u)}\n" for u in items))
        write_text_atomic(d / "text", "".join(f"{u.utt_id} {u.text}\n" for u in items))
        write_text_atomic(d / "utt2subdialect", "".join(f"{u.utt_id} {u.accent}\n" for u in items))
        write_text_atomic(d / "utt2spk", "".join(f"{u.utt_id} {u.speaker}\n" for u in items))


def _counts_table(utts: list[UttPlan], samples: dict[str, int]) -> tuple[dict, str]:
    table: dict[str, dict[str, float]] = {}
    for u in utts:
        key = f"{u.corpus}/{u.part}/{u.accent}"
        row = table.setdefault(key, {"utterances": 0, "hours": 0.0})
        row["utterances"] += 1
        row["hours"] += samples[u.utt_id] / SAMPLE_RATE / 3600
    lines = ["| corpus / part / accent | utterances | hours |", "|---|---|---|"]
    for key in sorted(table):
        table[key]["hours"] = round(table[key]["hours"], 4)
        lines.append(f"| {key} | {table[key]['utterances']} | {table[key]['hours']:.3f} |")
    return table, "\n".join(lines)


README_TEMPLATE = """# hdmole synthetic multi-accent Mandarin corpus ({version}, size `{size}`, seed {seed})

Generated by hdmole (`python -m hdmole.bin.prepare corpus data.synthetic_size={size}
data.synthetic_seed={seed}`). Not real speech:
espeak-ng voices reading numbered pinyin, with systematic pinyin rewrite rules per accent, so
that the project's recipe can run offline. Layouts: `aishell/` = AISHELL-1 (source domain,
standard Mandarin), `KeSpeech/` = KeSpeech ASR task (target domain, 9 subdialect labels).

## Text and licence
HSK sentences come from the `hsk-sentences-audio` package (https://github.com/no7z/hsk-sentences-audio),
whose sentence data is licensed CC-BY-SA-4.0 (https://creativecommons.org/licenses/by-sa/4.0/).
This corpus contains transcripts derived from that data and is therefore distributed under
CC-BY-SA-4.0 as well; credit: "hsk-sentences-audio contributors". Other sentences are produced
by a template grammar with words from jieba's dictionary (MIT). Audio: espeak-ng 1.52 via
espeakng-loader (GPL-3.0 program; its output audio is not covered by the GPL).

## Character inventory
{inventory_size} characters (inventory.txt); train/dev/test sentence sets are disjoint; dev/test
sentences use only characters seen at least {min_char_count} times in source training data.
{text_stats}

## Accent rules (numbered pinyin)
{rules}

## Speaking style and channel
{styles}

## Contents
{counts}
"""


def generate(out: str | Path, size_name: str = "default", seed: int = 0, nj: int = 2,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Generate (or resume, or recognise as done) the corpus under `out`; returns its manifest."""
    from tqdm import tqdm

    out = Path(out)
    plan = plan_corpus(size_name, seed)
    digest = plan.digest()
    manifest_path = out / MANIFEST_NAME
    plan_marker = out / ".synthetic_plan"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("plan_sha256") == digest:
            log.info("synthetic corpus in %s is complete (same plan); nothing to do", out)
            return manifest
    if plan_marker.exists() and plan_marker.read_text().strip() != digest or manifest_path.exists():
        if not overwrite:
            raise FileExistsError(f"{out} holds a synthetic corpus of another size/seed/version; "
                                  f"pass overwrite=True (run.sh's stage 0 does) or choose another directory")
        for sub in ("aishell", "KeSpeech"):
            shutil.rmtree(out / sub, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan_marker, digest + "\n")

    samples: dict[str, int] = {}
    utts = plan.utterances
    jobs = [(utts[i:i + BLOCK_SIZE], str(out)) for i in range(0, len(utts), BLOCK_SIZE)]
    bar = tqdm(total=len(utts), desc=f"synthesising {size_name} corpus", unit="utt", disable=not progress)
    if nj <= 1:
        results = map(_render_star, jobs)
    else:
        pool = get_context("spawn").Pool(nj)  # spawn: espeak-ng state is per process
        results = pool.imap_unordered(_render_star, jobs)
    try:
        for rendered in results:
            samples.update(rendered)
            bar.update(len(rendered))
    finally:
        if nj > 1:
            pool.terminate()
    bar.close()

    _write_layouts(out, plan.utterances)
    counts, counts_md = _counts_table(plan.utterances, samples)
    size = SIZES[size_name]
    write_text_atomic(out / "inventory.txt", "".join(f"{ch}\n" for ch in plan.inventory))
    stats_md = "\n".join(f"- {k}: {v}" for k, v in plan.text_stats.items())
    write_text_atomic(out / "README.md", README_TEMPLATE.format(
        version=CORPUS_VERSION, size=size_name, seed=seed, inventory_size=len(plan.inventory),
        min_char_count=size.min_char_count, text_stats=stats_md, rules=rule_table_markdown(),
        styles=style_table_markdown(), counts=counts_md))
    write_text_atomic(out / "LICENCE.md", "Transcripts: CC-BY-SA-4.0, derived from hsk-sentences-audio "
                      "(https://github.com/no7z/hsk-sentences-audio). See README.md.\n"
                      "https://creativecommons.org/licenses/by-sa/4.0/legalcode\n")
    manifest = {
        "version": CORPUS_VERSION, "size": size_name, "seed": seed, "plan_sha256": digest,
        "size_config": asdict(size), "text_stats": plan.text_stats, "counts": counts,
        "num_utterances": len(plan.utterances),
        "hours": round(sum(samples.values()) / SAMPLE_RATE / 3600, 4),
    }
    write_text_atomic(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
    plan_marker.unlink(missing_ok=True)
    return manifest
