#!/usr/bin/env python
"""The paper's claims (issue 6) as measured numbers, from a finished paper-comparison suite.

    python recipes/paper_claims.py exp/synthetic_default_tiny [--out exp/.../claims.md]

Reads each preset's decoded test sets through hdmole.score (the same CER as RESULTS.md) and
the target-test routing statistics (active experts per layer). Test sets are only read here:
nothing is tuned on them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hdmole.score import ExperimentScore, layer_summaries, load_json, score_experiment


def per_layer_active(exp_dir: Path) -> dict[str, float]:
    stats = load_json(exp_dir / "decode" / "kespeech_test" / "routing.json")
    return {name: s["active_mean"] for name, s in layer_summaries(stats).items() if s.get("active_mean") is not None}


def rel(a: float, b: float) -> float:
    """Relative change of a with respect to b, in %."""
    return 100.0 * (a - b) / b


def claims(root: Path) -> str:
    scores: dict[str, ExperimentScore] = {}
    for name in ("base", "full", "lora", "mole_topk", "hdmole"):
        if (root / name / "decode").exists():
            scores[name] = score_experiment(root / name, name)[0]
    missing = {"base", "full", "lora", "mole_topk", "hdmole"} - set(scores)
    if missing:
        raise SystemExit(f"{root}: presets not decoded yet: {sorted(missing)}")
    b, f, h, lo, tk = (scores[k] for k in ("base", "full", "hdmole", "lora", "mole_topk"))
    layers = per_layer_active(root / "hdmole")
    rows = [
        ("base: source test CER <= 15%", f"{b.source_cer:.2f}%", b.source_cer <= 15),
        ("base: mean accent CER >= 2x source", f"{b.mean_accent_cer:.2f}% = {b.mean_accent_cer / max(b.source_cer, 1e-9):.2f}x",
         b.mean_accent_cer >= 2 * b.source_cer),
        ("hdmole: mean accent CER >= 40% lower than base", f"{h.mean_accent_cer:.2f}% ({rel(h.mean_accent_cer, b.mean_accent_cer):+.1f}%)",
         h.mean_accent_cer <= 0.6 * b.mean_accent_cer),
        ("hdmole: within 5% relative of full", f"full {f.mean_accent_cer:.2f}% ({rel(h.mean_accent_cer, f.mean_accent_cer):+.1f}%)",
         h.mean_accent_cer <= 1.05 * f.mean_accent_cer),
        ("hdmole: <= 15% of full's trainable parameters",
         f"{h.trainable_params:,} / {f.trainable_params:,} = {100 * h.trainable_params / f.trainable_params:.1f}%",
         h.trainable_params <= 0.15 * f.trainable_params),
        ("hdmole: source-CER increase <= 1/3 of full's",
         f"hdmole {h.source_cer - b.source_cer:+.2f}, full {f.source_cer - b.source_cer:+.2f} points",
         (h.source_cer - b.source_cer) <= max(0.0, f.source_cer - b.source_cer) / 3),
        ("hdmole: lower mean accent CER than lora", f"lora {lo.mean_accent_cer:.2f}% ({lo.trainable_params:,} params)",
         h.mean_accent_cer < lo.mean_accent_cer),
        ("hdmole: lower mean accent CER than mole_topk", f"mole_topk {tk.mean_accent_cer:.2f}% ({tk.trainable_params:,} params)",
         h.mean_accent_cer < tk.mean_accent_cer),
        ("hdmole: active experts vary across layers", ", ".join(f"{k} {v:.2f}" for k, v in layers.items()) or "-",
         len(layers) > 1 and max(layers.values()) - min(layers.values()) >= 0.1),
    ]
    out = ["| claim | measured | met |", "|---|---|---|"]
    out += [f"| {c} | {m} | {'yes' if ok else 'no'} |" for c, m, ok in rows]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp_root", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = claims(args.exp_root)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
