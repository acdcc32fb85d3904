"""Stage 5: score decoded test sets of one or more experiment directories.

    hdmole-score exp/synthetic_default_tiny/hdmole [--name hdmole] [--no-plots]
    hdmole-score --compare exp/x/base exp/x/full exp/x/hdmole --out exp/x/comparison.md
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hdmole.bin.common import setup_logging
from hdmole.score import comparison_markdown, score_experiment, write_reports

log = logging.getLogger("hdmole.score")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp_dirs", nargs="+", type=Path)
    parser.add_argument("--name", help="row name (one experiment; default: the directory name)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--compare", action="store_true", help="one comparison table over all exp_dirs")
    parser.add_argument("--out", type=Path, help="with --compare: write the table here too")
    args = parser.parse_args(argv)
    setup_logging()
    if args.compare:
        table = comparison_markdown([score_experiment(d)[0] for d in args.exp_dirs])
        if args.out:
            args.out.write_text(table, encoding="utf-8")
        print(table)
        return
    if args.name and len(args.exp_dirs) > 1:
        parser.error("--name applies to one experiment directory")
    for d in args.exp_dirs:
        score = write_reports(d, args.name, plots=not args.no_plots)
        log.info("%s: mean accent CER %.2f%%, source CER %.2f%% -> %s", d, score.mean_accent_cer, score.source_cer,
                 d / "RESULTS.md")


if __name__ == "__main__":
    main()
