"""Scoring from text files only (imports no model): CER per accent, RESULTS.md, plots,
hallucination report.

Layout read here (written by hdmole.decode and the training loop):
    <exp>/decode/<test_set>/{hyp,ref,utt2accent}   `utt_id<TAB>text` / `utt_id<TAB>accent`
    <exp>/decode/<test_set>/routing.json            routing statistics while decoding (optional)
    <exp>/model_info.json                           trainable parameter counts
    <exp>/train_log.jsonl                           training log (thresholds over training)

CER is corpus level: sum of edits / sum of reference characters over a group, after the one
text normaliser (hdmole.data.text.normalize_text) is applied to BOTH reference and hypothesis.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import kaldialign

from hdmole.data.accents import ACCENTS, SOURCE_ACCENT
from hdmole.data.text import normalize_text
from hdmole.fileio import write_text_atomic

EPS = "*"
# Source-domain test sets (standard Mandarin, AISHELL-style); every other set is a target set
# whose utterances are grouped by accent.
SOURCE_PREFIXES = ("aishell",)


# ---- files -------------------------------------------------------------------------------------
def read_keyed(path: Path, allow_empty_value: bool = True) -> dict[str, str]:
    """`key<TAB>value` lines -> dict; a malformed line or a duplicate key fails naming file:line."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, value = line.partition("\t")
            if not key or (not sep and not allow_empty_value):
                raise ValueError(f"{path}:{lineno}: expected 'utt_id<TAB>text', got {line!r}")
            if key in out:
                raise ValueError(f"{path}:{lineno}: duplicate utterance id {key!r}")
            out[key] = value
    return out


def write_keyed(path: Path, values: dict[str, str]) -> None:
    lines = (f"{key}\t{values[key].replace(chr(9), ' ').replace(chr(10), ' ')}\n" for key in sorted(values))
    write_text_atomic(path, "".join(lines))


# ---- CER ---------------------------------------------------------------------------------------
@dataclass
class ErrorCounts:
    sub: int = 0
    dels: int = 0
    ins: int = 0
    ref_chars: int = 0
    utterances: int = 0

    def add(self, other: "ErrorCounts") -> None:
        self.sub += other.sub
        self.dels += other.dels
        self.ins += other.ins
        self.ref_chars += other.ref_chars
        self.utterances += other.utterances

    @property
    def errors(self) -> int:
        return self.sub + self.dels + self.ins

    @property
    def cer(self) -> float:
        """Percent; NaN for a group without reference characters."""
        return 100.0 * self.errors / self.ref_chars if self.ref_chars else math.nan


def char_errors(ref: str, hyp: str) -> ErrorCounts:
    """Edit counts between two already normalised strings, character by character."""
    if not ref:
        return ErrorCounts(ins=len(hyp), utterances=1)
    if not hyp:
        return ErrorCounts(dels=len(ref), ref_chars=len(ref), utterances=1)
    d = kaldialign.edit_distance(list(ref), list(hyp))
    return ErrorCounts(d["sub"], d["del"], d["ins"], len(ref), 1)


def corpus_cer(refs: Iterable[str], hyps: Iterable[str], normalise: Callable[[str], str] = normalize_text) -> float:
    """Corpus-level CER in percent over parallel lists (validation during training)."""
    total = ErrorCounts()
    for r, h in zip(refs, hyps, strict=True):
        total.add(char_errors(normalise(r), normalise(h)))
    return total.cer


# ---- hallucinations ----------------------------------------------------------------------------
_REPEAT = re.compile(r"(.{1,8}?)\1{2,}")  # a unit of 1-8 characters said three times in a row


def hallucination_reasons(ref: str, hyp: str) -> list[str]:
    """Why a hypothesis looks hallucinated: far too long, or a loop the reference lacks."""
    reasons = []
    if len(hyp) > 2 * max(1, len(ref)):
        reasons.append(f"length {len(hyp)} > 2 x ref {len(ref)}")
    ref_loops = {m.group(0) for m in _REPEAT.finditer(ref)}
    loops = [m.group(0) for m in _REPEAT.finditer(hyp) if m.group(0) not in ref_loops]
    if loops:
        reasons.append(f"repeated n-gram {loops[0]!r}")
    return reasons


# ---- one test set --------------------------------------------------------------------------------
@dataclass
class SetScore:
    name: str
    total: ErrorCounts
    per_accent: dict[str, ErrorCounts]
    missing_hyps: int  # references without a hypothesis (scored as all deletions)
    extra_hyps: int  # hypotheses without a reference (ignored)
    hallucinations: list[tuple[str, str, str, str]] = field(default_factory=list)  # id, ref, hyp, why


def score_set(set_dir: Path, normalise: Callable[[str], str] = normalize_text) -> SetScore:
    refs = read_keyed(set_dir / "ref")
    hyps = read_keyed(set_dir / "hyp") if (set_dir / "hyp").exists() else {}
    accents = read_keyed(set_dir / "utt2accent", allow_empty_value=False) if (set_dir / "utt2accent").exists() else {}
    if not refs:
        raise ValueError(f"{set_dir / 'ref'}: no reference lines")
    total, per_accent, halluc = ErrorCounts(), {}, []
    for utt, ref_raw in refs.items():
        ref, hyp = normalise(ref_raw), normalise(hyps.get(utt, ""))
        counts = char_errors(ref, hyp)
        total.add(counts)
        accent = accents.get(utt, "unknown")
        per_accent.setdefault(accent, ErrorCounts()).add(counts)
        why = hallucination_reasons(ref, hyp)
        if why:
            halluc.append((utt, ref, hyp, "; ".join(why)))
    return SetScore(set_dir.name, total, per_accent, missing_hyps=len(set(refs) - set(hyps)),
                    extra_hyps=len(set(hyps) - set(refs)), hallucinations=halluc)


def is_source_set(name: str) -> bool:
    return name.startswith(SOURCE_PREFIXES)


# ---- significance: paired bootstrap over utterances -----------------------------------------------
def utterance_errors(set_dir: Path, normalise: Callable[[str], str] = normalize_text
                     ) -> dict[str, tuple[int, int, str]]:
    """Per utterance of a decoded set: (edits, reference characters, accent)."""
    refs = read_keyed(set_dir / "ref")
    hyps = read_keyed(set_dir / "hyp") if (set_dir / "hyp").exists() else {}
    accents = read_keyed(set_dir / "utt2accent", allow_empty_value=False) if (set_dir / "utt2accent").exists() else {}
    out = {}
    for utt, ref_raw in refs.items():
        c = char_errors(normalise(ref_raw), normalise(hyps.get(utt, "")))
        out[utt] = (c.sub + c.dels + c.ins, c.ref_chars, accents.get(utt, "unknown"))
    return out


def paired_bootstrap(edits_a, edits_b, ref_chars, groups, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """CER(a) - CER(b) in points with a paired bootstrap confidence interval, resampling
    utterances within each group (accent) and averaging the groups' corpus-level CERs
    unweighted (the "mean accent CER"; one group = plain corpus CER). edits_*: per-utterance
    edit counts of the two systems on the same utterances (e.g. means over seeds); ref_chars:
    reference lengths; groups: group label per utterance. Returns (difference, low, high)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = np.asarray(edits_a, float), np.asarray(edits_b, float)
    n, labels = np.asarray(ref_chars, float), np.asarray(groups)
    diff, samples = 0.0, np.zeros(resamples)
    names = sorted(set(labels.tolist()))
    for name in names:
        idx = np.flatnonzero(labels == name)
        diff += 100.0 * (a[idx].sum() - b[idx].sum()) / n[idx].sum()
        draw = idx[rng.integers(0, len(idx), size=(resamples, len(idx)))]
        samples += 100.0 * (a[draw].sum(1) - b[draw].sum(1)) / n[draw].sum(1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(samples / len(names), [tail, 1.0 - tail])
    return diff / len(names), float(low), float(high)


# ---- one experiment ------------------------------------------------------------------------------
@dataclass
class ExperimentScore:
    name: str
    accent_cer: dict[str, float]  # the 9 accents, target test data
    mean_accent_cer: float  # unweighted mean over the accents present
    target_cer: float  # corpus-level over all target test utterances
    source_cer: float  # source-domain test set(s)
    trainable_params: int | None
    full_params: int | None  # what full fine-tuning of the adapted module trains
    mean_active_experts: float | None
    hallucinations: int
    utterances: int
    missing_hyps: int

    @property
    def trainable_percent_of_full(self) -> float | None:
        if self.trainable_params is None or not self.full_params:
            return None
        return 100.0 * self.trainable_params / self.full_params


def load_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e


def layer_summaries(stats: dict | None) -> dict[str, dict]:
    """Per-layer routing summaries from a statistics_summary() dict (mixture layers only)."""
    if not stats:
        return {}
    layers = stats.get("layers", stats)
    return {k: v for k, v in layers.items() if isinstance(v, dict) and "active_histogram" in v}


def mean_active_experts(stats: dict | None) -> float | None:
    """Token-weighted mean |S| over all mixture layers (None when there are none)."""
    tokens = weighted = 0.0
    for s in layer_summaries(stats).values():
        if s.get("active_mean") is not None and s.get("tokens"):
            tokens += s["tokens"]
            weighted += s["tokens"] * s["active_mean"]
    return weighted / tokens if tokens else None


def decoded_sets(exp_dir: Path) -> list[Path]:
    root = exp_dir / "decode"
    sets = sorted(p for p in root.glob("*") if (p / "ref").exists()) if root.exists() else []
    if not sets:
        raise FileNotFoundError(f"{root}: no decoded test sets (run the decoding stage first)")
    return sets


def score_experiment(exp_dir: Path, name: str | None = None) -> tuple[ExperimentScore, list[SetScore]]:
    sets = [score_set(d) for d in decoded_sets(exp_dir)]
    target, source = ErrorCounts(), ErrorCounts()
    per_accent: dict[str, ErrorCounts] = {}
    for s in sets:
        if is_source_set(s.name):
            source.add(s.total)
            continue
        target.add(s.total)
        for accent, counts in s.per_accent.items():
            per_accent.setdefault(accent, ErrorCounts()).add(counts)
    accent_cer = {a: per_accent[a].cer for a in ACCENTS if a in per_accent}
    info = load_json(exp_dir / "model_info.json") or {}
    routing = [load_json(d / "routing.json") for d in decoded_sets(exp_dir) if not is_source_set(d.name)]
    actives = [m for m in (mean_active_experts(r) for r in routing) if m is not None]
    score = ExperimentScore(
        name=name or exp_dir.name,
        accent_cer=accent_cer,
        mean_accent_cer=sum(accent_cer.values()) / len(accent_cer) if accent_cer else math.nan,
        target_cer=target.cer,
        source_cer=source.cer,
        trainable_params=info.get("trainable_params"),
        full_params=info.get("full_params"),
        mean_active_experts=sum(actives) / len(actives) if actives else None,
        hallucinations=sum(len(s.hallucinations) for s in sets),
        utterances=sum(s.total.utterances for s in sets),
        missing_hyps=sum(s.missing_hyps for s in sets),
    )
    return score, sets


# ---- reports -----------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _params(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def results_markdown(score: ExperimentScore, sets: list[SetScore]) -> str:
    lines = [f"# Results: {score.name}", "",
             "CER in % (corpus level: sum of edits / sum of reference characters, after the same "
             "normaliser on reference and hypothesis).", "",
             "| test set | accent | utterances | ref chars | sub | del | ins | CER |", "|---|---|---|---|---|---|---|---|"]
    for s in sets:
        groups = [("all", s.total)] + ([] if is_source_set(s.name) else sorted(s.per_accent.items(),
                                        key=lambda kv: ACCENTS.index(kv[0]) if kv[0] in ACCENTS else 99))
        for accent, c in groups:
            lines.append(f"| {s.name} | {accent} | {c.utterances} | {c.ref_chars} | {c.sub} | {c.dels} | "
                         f"{c.ins} | {_fmt(c.cer)} |")
    pct = score.trainable_percent_of_full
    lines += ["", "| summary | value |", "|---|---|",
              f"| mean CER over the {len(score.accent_cer)} accents | {_fmt(score.mean_accent_cer)} |",
              f"| target CER (all target utterances) | {_fmt(score.target_cer)} |",
              f"| source CER ({SOURCE_ACCENT} source domain) | {_fmt(score.source_cer)} |",
              f"| trainable parameters | {_params(score.trainable_params)} |",
              f"| % of full fine-tuning | {_fmt(pct, 1)} |",
              f"| mean active experts | {_fmt(score.mean_active_experts)} |",
              f"| hallucinated hypotheses | {score.hallucinations} |",
              f"| references without hypothesis | {score.missing_hyps} |"]
    return "\n".join(lines) + "\n"


def comparison_markdown(scores: list[ExperimentScore]) -> str:
    """One table for a suite of experiments on the same base (the paper comparison)."""
    accents = [a for a in ACCENTS if any(a in s.accent_cer for s in scores)]
    head = ["method"] + accents + ["mean target", "source", "trainable params", "% of full", "active experts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scores:
        row = [s.name] + [_fmt(s.accent_cer.get(a)) for a in accents]
        row += [_fmt(s.mean_accent_cer), _fmt(s.source_cer), _params(s.trainable_params),
                _fmt(s.trainable_percent_of_full, 1), _fmt(s.mean_active_experts)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def hallucination_report(sets: list[SetScore]) -> str:
    lines = ["utt_id\ttest_set\treason\tref\thyp"]
    for s in sets:
        for utt, ref, hyp, why in s.hallucinations:
            lines.append(f"{utt}\t{s.name}\t{why}\t{ref}\t{hyp}")
    return "\n".join(lines) + "\n"


def write_reports(exp_dir: Path, name: str | None = None, plots: bool = True) -> ExperimentScore:
    """Everything stage 5 produces for one experiment directory; returns the scores."""
    score, sets = score_experiment(exp_dir, name)
    (exp_dir / "RESULTS.md").write_text(results_markdown(score, sets), encoding="utf-8")
    (exp_dir / "hallucinations.tsv").write_text(hallucination_report(sets), encoding="utf-8")
    (exp_dir / "scores.json").write_text(json.dumps(asdict(score), indent=1, ensure_ascii=False, default=str)
                                         + "\n", encoding="utf-8")
    if plots:
        write_plots(exp_dir, score)
    return score


# ---- plots (PNG, matplotlib Agg) ---------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def target_routing(exp_dir: Path) -> dict | None:
    """Decoding-time routing statistics of the (first) target test set."""
    for d in decoded_sets(exp_dir):
        if not is_source_set(d.name) and (d / "routing.json").exists():
            return load_json(d / "routing.json")
    return None


def tau_over_training(exp_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per layer: (step, tau) from the training log: every logged step (metric/tau/<layer>,
    the mean over the logging window), else the routing records of the validations."""
    from hdmole.runlog import read_log

    series: dict[str, list[tuple[int, float]]] = {}
    prefix = "metric/tau/"
    for rec in read_log(exp_dir, "train"):
        for key, value in rec.items():
            if key.startswith(prefix):
                series.setdefault(key[len(prefix):], []).append((rec["step"], value))
    if series:
        return series
    for rec in read_log(exp_dir, "routing"):
        for layer, s in layer_summaries(rec).items():
            if s.get("tau_current") is not None:
                series.setdefault(layer, []).append((rec["step"], s["tau_current"]))
    return series


def write_plots(exp_dir: Path, score: ExperimentScore) -> list[Path]:
    plt = _pyplot()
    out_dir = exp_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(score.accent_cer) + ["source"]
    ax.bar(names, list(score.accent_cer.values()) + [score.source_cer],
           color=["C0"] * len(score.accent_cer) + ["C1"])
    ax.set_ylabel("CER (%)")
    ax.set_title(f"{score.name}: CER per accent (mean {_fmt(score.mean_accent_cer)})")
    ax.tick_params(axis="x", rotation=45)
    save(fig, "cer_per_accent.png")

    layers = layer_summaries(target_routing(exp_dir))
    if layers:
        n = len(layers)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
        for ax, (layer, s) in zip(axes.flat, layers.items()):
            hist = s["active_histogram"]
            total = sum(hist) or 1
            ax.bar(range(len(hist)), [h / total for h in hist])
            ax.set_title(f"{layer}\nmean {_fmt(s.get('active_mean'))}", fontsize=8)
            ax.set_xlabel("active experts")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        save(fig, "active_experts_per_layer.png")

        mats = [s["accent_expert_weight"] for s in layers.values()
                if any(row for row in (s.get("accent_expert_weight") or []))]
        if mats:
            import warnings

            import numpy as np

            def matrix(rows: list) -> np.ndarray:  # accents without tokens are null rows
                width = max(len(r) for r in rows if r)
                return np.array([r if r else [np.nan] * width for r in rows], dtype=float)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
                mat = np.nanmean(np.stack([matrix(m) for m in mats]), axis=0)
            fig, ax = plt.subplots(figsize=(6, 4.5))
            im = ax.imshow(mat, aspect="auto", cmap="viridis")
            ax.set_yticks(range(mat.shape[0]), ACCENTS[: mat.shape[0]], fontsize=8)
            ax.set_xlabel("expert")
            ax.set_title("mean routing weight (accent x expert, mean over layers)")
            fig.colorbar(im)
            save(fig, "accent_expert_heatmap.png")

    taus = tau_over_training(exp_dir)
    if taus:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for layer, pts in taus.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=layer)
        ax.set_xlabel("step")
        ax.set_ylabel("threshold tau")
        ax.legend(fontsize=6)
        save(fig, "thresholds_over_training.png")
    return written
