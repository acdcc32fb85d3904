#!/usr/bin/env python
"""The paper comparison's choices and report, from a finished sweep (recipes/paper_comparison.sh).

    python recipes/paper_results.py choose exp/synthetic_default_tiny/sweep hdmole   # prints the lr
    python recipes/paper_results.py report exp/synthetic_default_tiny/sweep --out RESULTS.md

A sweep holds <sweep>/<preset>/lr<lr>_seed<seed>/ runs. `extend`: when a preset's best grid lr
is on the grid's edge, the next lr beyond it (the recipe trains it before choosing).
`choose`: the lr of the seed-0 runs (grid and extension) with the lowest accent dev CER (the run's best checkpoint, model_info.json; ties: the
smaller lr). Only dev CERs are read for a choice. `report`: per preset, at its chosen lr, the
test CERs of every seed (mean +/- sd), paired bootstrap 95 % confidence intervals of hdmole
minus the baselines (per-utterance edits averaged over seeds, utterances resampled within each
accent), the paper's claims judged with them, the grid, and plots under docs/results/.
"""
from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path

from hdmole.bin.sweep import DECODED  # the marker of a run whose every test set is decoded
from hdmole.data.accents import ACCENTS
from hdmole.score import (ExperimentScore, decoded_sets, is_source_set, layer_summaries, load_json,
                          paired_bootstrap, score_experiment, tau_over_training, utterance_errors)

RUN = re.compile(r"lr(?P<lr>[^_]+)_seed(?P<seed>\d+)")
BASELINES = ("full", "lora", "mole_topk", "hdmole_no_hier")
PLOTS = Path("docs/results")  # relative to the report's directory


def runs(sweep: Path, preset: str) -> dict[tuple[str, int], Path]:
    """(lr as written in the directory name, seed) -> run directory."""
    out = {}
    for d in sorted((sweep / preset).glob("lr*_seed*")):
        m = RUN.fullmatch(d.name)
        if m and (d / "model_info.json").is_file():
            out[(m["lr"], int(m["seed"]))] = d
    return out


def dev_cer(run: Path) -> float:
    info = load_json(run / "model_info.json") or {}
    value = info.get("best_metric")
    if value is None:
        raise SystemExit(f"{run}/model_info.json: no best_metric (dev CER); unfinished run?")
    return float(value)


def grid(sweep: Path, preset: str) -> dict[str, float]:
    """lr -> dev CER of the seed-0 runs."""
    return {lr: dev_cer(d) for (lr, seed), d in runs(sweep, preset).items() if seed == 0}


def choose(sweep: Path, preset: str) -> str:
    points = grid(sweep, preset)
    if not points:
        raise SystemExit(f"{sweep / preset}: no finished seed-0 runs of the lr grid")
    return min(points, key=lambda lr: (points[lr], float(lr)))


def extend(sweep: Path, preset: str, lrs: list[str]) -> str:
    """The next lr beyond the grid's edge when the preset's best grid lr is on that edge (one
    step of the grid's own spacing), else "": a best value on the edge says the optimum may
    lie outside the grid."""
    values = sorted((float(v) for v in lrs))
    best = float(choose(sweep, preset))
    if len(values) < 2 or values[0] < best < values[-1]:
        return ""
    edge, neighbour = (values[0], values[1]) if best <= values[0] else (values[-1], values[-2])
    return f"{edge * edge / neighbour:.3g}"


def mean_sd(values: list[float], sd: bool = True) -> str:
    if not values or any(v is None or math.isnan(v) for v in values):
        return "-"
    if not sd:
        return f"{statistics.fmean(values):.2f}"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


class Preset:
    """The chosen lr's runs of one preset: scores and per-utterance edits per seed."""

    def __init__(self, sweep: Path, name: str) -> None:
        self.name = name
        all_runs = runs(sweep, name)
        self.lr = "-" if name == "base" else choose(sweep, name)
        self.runs = {seed: d for (lr, seed), d in sorted(all_runs.items())
                     if (lr == self.lr or name == "base") and (d / DECODED).is_file()}
        if not self.runs:
            raise SystemExit(f"{sweep / name}: no decoded run at the chosen lr {self.lr}")
        self.scores: dict[int, ExperimentScore] = {s: score_experiment(d, name)[0] for s, d in self.runs.items()}

    def values(self, field: str) -> list[float]:
        return [getattr(s, field) for s in self.scores.values()]

    def edits(self, source: bool) -> dict[str, tuple[float, int, str]]:
        """Per utterance: (edits averaged over seeds, reference characters, accent)."""
        per_seed = []
        for d in self.runs.values():
            utts = {}
            for set_dir in decoded_sets(d):
                if is_source_set(set_dir.name) == source:
                    utts.update(utterance_errors(set_dir))
            per_seed.append(utts)
        ids = sorted(per_seed[0])
        return {u: (statistics.fmean(s[u][0] for s in per_seed), per_seed[0][u][1],
                    "source" if source else per_seed[0][u][2]) for u in ids}


def compare(a: Preset, b: Preset, source: bool) -> tuple[float, float, float]:
    ea, eb = a.edits(source), b.edits(source)
    if set(ea) != set(eb):
        raise SystemExit(f"{a.name} and {b.name} decoded different utterances")
    ids = sorted(ea)
    return paired_bootstrap([ea[u][0] for u in ids], [eb[u][0] for u in ids], [ea[u][1] for u in ids],
                            [ea[u][2] for u in ids])


def routing(run: Path) -> dict[str, dict]:
    for set_dir in decoded_sets(run):
        if not is_source_set(set_dir.name):
            return layer_summaries(load_json(set_dir / "routing.json"))
    return {}


def own_expert_share(layer: dict) -> float | None:
    """Mean over accents of the routing weight on the accent's own expert (expert i = accent i)."""
    rows = layer.get("accent_expert_weight") or []
    shares = [row[i] for i, row in enumerate(rows) if row and i < len(row)]
    return statistics.fmean(shares) if shares else None


def own_expert_on_top(layer: dict) -> int:
    """Accents whose largest routing weight is on their own expert."""
    rows = layer.get("accent_expert_weight") or []
    return sum(1 for i, row in enumerate(rows) if row and max(range(len(row)), key=row.__getitem__) == i)


def plots(presets: dict[str, Preset], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = list(presets)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for k, (field, label) in enumerate((("mean_accent_cer", "mean accent"), ("source_cer", "source"))):
        vals = [presets[n].values(field) for n in names]
        ax.bar(np.arange(len(names)) + 0.4 * k, [statistics.fmean(v) for v in vals], width=0.4, label=label,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=2)
    ax.set_xticks(np.arange(len(names)) + 0.2, names, rotation=45, ha="right")
    ax.set_ylabel("test CER (%), mean ± sd over seeds")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "comparison_cer.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    if "hdmole" in presets:
        hd = presets["hdmole"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for seed, run in hd.runs.items():
            for k, (layer, pts) in enumerate(sorted(tau_over_training(run).items())):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{k}", alpha=0.8,
                        label=f"{layer}" if seed == min(hd.runs) else None)
        ax.set_xlabel("step")
        ax.set_ylabel("threshold tau")
        ax.set_title("hdmole: per-layer thresholds over training (every seed)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "hdmole_tau_over_training.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        layers = routing(hd.runs[min(hd.runs)])
        if layers:
            fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4), squeeze=False)
            for ax, (layer, s) in zip(axes[0], layers.items()):
                rows = s["accent_expert_weight"]
                mat = np.array([r if r else [np.nan] * len(rows[0]) for r in rows], dtype=float)
                im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
                ax.set_yticks(range(mat.shape[0]), ACCENTS[: mat.shape[0]], fontsize=7)
                ax.set_xlabel("expert")
                ax.set_title(f"{layer}: routing weight, accent x expert", fontsize=9)
            fig.colorbar(im, ax=axes[0].tolist())
            written.append(out_dir / "hdmole_accent_expert_heatmap.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def summary_table(presets: dict[str, Preset]) -> str:
    """The README's table: per preset its lr, mean accent and source CER (mean ± sd)."""
    full = presets.get("full")
    full_params = full.scores[min(full.scores)].trainable_params if full else None
    lines = ["| method | lr (dev) | mean accent CER | source CER | trainable (% of full) |", "|---|---|---|---|---|"]
    for n, p in presets.items():
        params = p.scores[min(p.scores)].trainable_params or 0
        share = f" ({100 * params / full_params:.1f})" if full_params and params else ""
        lines.append(f"| {n} | {p.lr} | {mean_sd(p.values('mean_accent_cer'))} | {mean_sd(p.values('source_cer'))} "
                     f"| {params:,}{share} |")
    return "\n".join(lines) + "\n"


def decoded_presets(sweep: Path, names: list[str]) -> tuple[dict[str, Preset], list[str]]:
    """The presets with at least one decoded run at their chosen lr, and the names of the rest
    (an unfinished suite still reports what it has; the table's seeds column says how much)."""
    presets, missing = {}, []
    for n in names:
        try:
            presets[n] = Preset(sweep, n)
        except SystemExit:
            missing.append(n)
    return presets, missing


def report(sweep: Path, names: list[str], out: Path | None, readme: Path | None = None) -> str:
    presets, missing = decoded_presets(sweep, names)
    if not presets:
        raise SystemExit(f"{sweep}: no preset has a decoded run yet")
    if readme is not None:
        write_generated(readme, summary_table(presets))
    lines = ["## Table: test CER %, mean ± sd over seeds, at each preset's dev-chosen lr", "",
             "| method | lr | seeds | " + " | ".join(ACCENTS) + " | mean accent | source | trainable params | % of full "
             "| active experts |", "|---|---|---|" + "---|" * (len(ACCENTS) + 5)]
    full_params = None
    if "full" in presets:
        full_params = presets["full"].scores[min(presets["full"].scores)].trainable_params
    for n, p in presets.items():
        first = p.scores[min(p.scores)]
        per_accent = [mean_sd([s.accent_cer.get(a, math.nan) for s in p.scores.values()], sd=False)
                      for a in ACCENTS]
        active = [s.mean_active_experts for s in p.scores.values() if s.mean_active_experts is not None]
        share = (f"{100 * first.trainable_params / full_params:.1f}" if full_params and first.trainable_params
                 else "-")
        lines.append(f"| {n} | {p.lr} | {len(p.scores)} | " + " | ".join(per_accent)
                     + f" | {mean_sd(p.values('mean_accent_cer'))} | {mean_sd(p.values('source_cer'))} | "
                     f"{first.trainable_params or 0:,} | {share} | "
                     + (f"{statistics.fmean(active):.2f} |" if active else "- |"))
    lines += ["", "Per-accent columns: seed means. `lr`: the grid point with the lowest accent dev CER "
              "(seed 0)." + (f" Not decoded yet: {', '.join(missing)}." if missing else ""), "",
              "## The lr grid: accent dev CER % of the best checkpoint, seed 0", ""]
    lrs = sorted({lr for n in names if n != "base" for lr in grid(sweep, n)}, key=float)
    lines += ["| method | " + " | ".join(lrs) + " |", "|---|" + "---|" * len(lrs)]
    for n in names:
        if n == "base" or not grid(sweep, n):
            continue
        best = choose(sweep, n)
        g = grid(sweep, n)
        lines.append(f"| {n} | " + " | ".join(
            (f"**{g[lr]:.2f}**" if lr == best else f"{g[lr]:.2f}") if lr in g else "-" for lr in lrs) + " |")
    lines += ["", "Bold: the chosen lr. A best value on the grid's edge got one more lr beyond it "
              "(recipes/paper_comparison.sh)."]

    hd = presets.get("hdmole")
    cis: dict[tuple[str, bool], tuple[float, float, float]] = {}
    if hd is not None:
        lines += ["", "## hdmole minus each baseline: paired bootstrap 95 % CI (2,000 resamples of utterances "
                  "within each accent; per-utterance edits averaged over seeds)", "",
                  "| baseline | mean accent CER: hdmole - baseline [95 % CI] | source CER: hdmole - baseline [95 % CI] |",
                  "|---|---|---|"]
        for b in BASELINES:
            if b not in presets:
                continue
            row = []
            for source in (False, True):
                cis[(b, source)] = d, lo, hi = compare(hd, presets[b], source)
                row.append(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            lines.append(f"| {b} | {row[0]} | {row[1]} |")
        lines += ["", claims(presets, cis)]
    base_dir = out.parent if out is not None else Path(".")
    written = plots(presets, base_dir / PLOTS)
    lines += ["", *(f"![{p.stem}]({p.relative_to(base_dir).as_posix()})" for p in written)]
    wall = sweep / "wall_time.txt"
    if wall.is_file():
        lines += ["", f"Suite wall time: {wall.read_text(encoding='utf-8').strip().splitlines()[-1]}."]
    text = "\n".join(lines) + "\n"
    if out is not None:
        write_generated(out, text)
    return text


BEGIN, END = "<!-- paper_results.py report: begin -->", "<!-- paper_results.py report: end -->"


def write_generated(path: Path, text: str) -> None:
    """Replace the text between the BEGIN and END markers of `path` (the rest is prose kept
    across regenerations); a file without markers gets them appended."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = old + ("\n" if old else ""), "\n"
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}", encoding="utf-8")


def verdict(ci: tuple[float, float, float]) -> str:
    _, lo, hi = ci
    if hi < 0:
        return "hdmole lower (CI below 0)"
    if lo > 0:
        return "hdmole higher (CI above 0)"
    return "no difference resolved (CI spans 0)"


def claims(presets: dict[str, Preset], cis: dict) -> str:
    hd = presets["hdmole"]
    rows = []
    mean = lambda p, f: statistics.fmean(p.values(f))  # noqa: E731
    if "base" in presets:
        b = presets["base"]
        rel = 100 * (mean(hd, "mean_accent_cer") - mean(b, "mean_accent_cer")) / mean(b, "mean_accent_cer")
        rows.append(("hdmole lowers the mean accent CER of the base", f"{rel:+.1f} % relative", rel < 0))
    if "full" in presets:
        f = presets["full"]
        rel = 100 * (mean(hd, "mean_accent_cer") - mean(f, "mean_accent_cer")) / mean(f, "mean_accent_cer")
        d, lo, hi = cis[("full", False)]
        rows.append(("hdmole similar to full on the accents (within 5 % relative)",
                     f"{rel:+.1f} % relative; difference {d:+.2f} [{lo:+.2f}, {hi:+.2f}] points", abs(rel) <= 5))
        hp, fp = hd.scores[min(hd.scores)].trainable_params, f.scores[min(f.scores)].trainable_params
        rows.append(("hdmole trains about a tenth of full's parameters (paper: 9.6 %)",
                     f"{hp:,} / {fp:,} = {100 * hp / fp:.1f} %", hp <= 0.15 * fp))
        if "base" in presets:
            b = presets["base"]
            dh = mean(hd, "source_cer") - mean(b, "source_cer")
            df = mean(f, "source_cer") - mean(b, "source_cer")
            d, lo, hi = cis[("full", True)]
            rows.append(("hdmole degrades the source domain far less than full (at most 1/3 of its increase)",
                         f"source +{dh:.2f} vs full +{df:.2f} points over the base; hdmole - full "
                         f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]", dh <= max(df, 0) / 3 and hi < 0))
    for b in ("lora", "mole_topk", "hdmole_no_hier"):
        if (b, False) in cis:
            d, lo, hi = cis[(b, False)]
            rows.append((f"hdmole beats {b} on the accents", f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] points: "
                         f"{verdict(cis[(b, False)])}", hi < 0))
    layers = [routing(r) for r in hd.runs.values()]
    actives = {k: statistics.fmean(l[k]["active_mean"] for l in layers) for k in layers[0]}
    rows.append(("active experts differ across layers", ", ".join(f"{k} {v:.2f}" for k, v in actives.items()),
                 max(actives.values()) - min(actives.values()) >= 0.1))
    taus = [tau_over_training(r) for r in hd.runs.values()]
    start_end = {k: (statistics.fmean(t[k][0][1] for t in taus), statistics.fmean(t[k][-1][1] for t in taus))
                 for k in taus[0]}
    moved = all(abs(e - s) >= 0.005 for s, e in start_end.values())
    ends = [e for _, e in start_end.values()]
    rows.append(("tau is learned: it moves in training and ends different across layers",
                 ", ".join(f"{k} {s:.4f} -> {e:.4f}" for k, (s, e) in start_end.items()),
                 moved and max(ends) - min(ends) >= 0.005))
    own = {k: statistics.fmean(v for v in (own_expert_share(l[k]) for l in layers) if v is not None)
           for k in layers[0]}
    top = {k: statistics.fmean(own_expert_on_top(l[k]) for l in layers) for k in layers[0]}
    uniform = 100 / len(layers[0][next(iter(layers[0]))]["accent_expert_weight"][0])
    rows.append(("routing corresponds to accents (an accent's weight mostly, > 50 %, on its own expert)",
                 "; ".join(f"{k}: {100 * v:.0f} % on the own expert (uniform {uniform:.0f} %), the own expert "
                           f"on top for {top[k]:.1f} of 9 accents" for k, v in own.items()),
                 min(own.values()) > 0.5))
    out = ["## The paper's claims, judged", "", "| claim | measured (seed means; CIs as above) | holds |",
           "|---|---|---|"]
    out += [f"| {c} | {m} | {'yes' if ok else 'no'} |" for c, m, ok in rows]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("choose", help="print the preset's lr with the lowest dev CER")
    c.add_argument("sweep", type=Path)
    c.add_argument("preset")
    e = sub.add_parser("extend", help="print the lr one grid step beyond an edge optimum, or nothing")
    e.add_argument("sweep", type=Path)
    e.add_argument("preset")
    e.add_argument("--lrs", required=True, help="the grid, comma-separated")
    r = sub.add_parser("report", help="tables, CIs, claims and plots of the chosen runs")
    r.add_argument("sweep", type=Path)
    r.add_argument("--presets", default="base full lora lora_active mole_dense mole_topk mole_topp adamole "
                                        "oracle_accent hdmole hdmole_no_hier hdmole_topk")
    r.add_argument("--out", type=Path)
    r.add_argument("--readme", type=Path, help="also write the summary table between this file's markers")
    args = parser.parse_args()
    if args.command == "choose":
        print(choose(args.sweep, args.preset))
        return
    if args.command == "extend":
        print(extend(args.sweep, args.preset, args.lrs.split(",")))
        return
    sys.stdout.write(report(args.sweep, args.presets.split(), args.out, args.readme))


if __name__ == "__main__":
    main()
