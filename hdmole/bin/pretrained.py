"""The shipped tiny base model (hdmole.train.pretrained).

    hdmole-pretrained export RUN_DIR OUT_DIR --corpus KEY [--meta meta.json]
    hdmole-pretrained matches PRETRAINED_DIR --corpus KEY      # exit 0 when usable for this corpus
    hdmole-pretrained overrides PRETRAINED_DIR                 # Hydra overrides, one per line
    hdmole-pretrained base-overrides BASE_RUN_DIR              # the model keys a base run was built with
    hdmole-pretrained install PRETRAINED_DIR BASE_DIR [hydra overrides...] --corpus KEY
    hdmole-pretrained plan-base --train-base auto|true|false --model M --pretrained DIR --corpus KEY \
        --base-dir BASE_DIR --marker STAGE2_DONE --key TRAINED_KEY   # one line: existing|shipped|train REASON

KEY is the corpus's stage-0 key (`hdmole-prepare corpus-id ...`, kept in data/<corpus>/.done/stage0).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hdmole.bin.common import setup_logging

log = logging.getLogger("hdmole.pretrained")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--corpus", required=True)
    p.add_argument("--meta", type=Path, help="JSON merged into base.json (command, seed, scores, ...)")
    p = sub.add_parser("matches")
    p.add_argument("pretrained_dir", type=Path)
    p.add_argument("--corpus", required=True)
    p = sub.add_parser("overrides")
    p.add_argument("pretrained_dir", type=Path)
    p = sub.add_parser("base-overrides", help="a base run's model directories and projector shape")
    p.add_argument("base_dir", type=Path)
    p = sub.add_parser("install")
    p.add_argument("pretrained_dir", type=Path)
    p.add_argument("base_dir", type=Path)
    p.add_argument("--corpus", required=True)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("plan-base", help="stage 2's base model: the existing, the shipped or a trained one")
    p.add_argument("--train-base", required=True, choices=("auto", "true", "false"))
    p.add_argument("--model", required=True)
    p.add_argument("--pretrained", required=True, help='the shipped base directory; "" = never use it')
    p.add_argument("--corpus", required=True)
    p.add_argument("--base-dir", required=True, type=Path)
    p.add_argument("--marker", required=True, type=Path, help="stage 2's done marker")
    p.add_argument("--key", required=True, help="the settings of a base trained here (run.sh's marker key)")
    args = parser.parse_args(argv)
    setup_logging()
    from hdmole.train import pretrained as pt

    if args.cmd == "export":
        meta = json.loads(args.meta.read_text(encoding="utf-8")) if args.meta else None
        pt.export_base(args.run_dir, args.out_dir, args.corpus, meta)
    elif args.cmd == "matches":
        try:
            pt.check_corpus(args.pretrained_dir, args.corpus)
        except (FileNotFoundError, ValueError) as e:
            log.info("shipped base not usable: %s", e)
            sys.exit(1)
    elif args.cmd == "overrides":
        print("\n".join(pt.model_overrides(args.pretrained_dir)))
    elif args.cmd == "base-overrides":
        print("\n".join(pt.base_model_overrides(args.base_dir)))
    elif args.cmd == "plan-base":
        try:
            plan = pt.plan_base(args.train_base, args.model, args.pretrained, args.corpus, args.base_dir,
                                args.marker, args.key)
        except FileNotFoundError as e:
            log.error("%s", e)
            sys.exit(1)
        print(plan.decision, plan.reason)
    else:
        pt.install_base(args.pretrained_dir, args.base_dir, args.corpus, args.overrides)
        log.info("base model %s installed from %s", args.base_dir, args.pretrained_dir)


if __name__ == "__main__":
    main()
