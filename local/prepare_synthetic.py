#!/usr/bin/env python3
"""Generate the synthetic AISHELL-layout + KeSpeech-layout corpus (see docs/data.md).

    python local/prepare_synthetic.py --size default --out data/corpus --seed 0 --nj 2
"""
from __future__ import annotations

import argparse
import json
import logging
import time

from hdmole.data.synthetic import SIZES, generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--out", default="data/corpus", help="corpus root (gets aishell/ and KeSpeech/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nj", type=int, default=2, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus of another size/seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.time()
    manifest = generate(args.out, args.size, args.seed, args.nj, args.overwrite)
    summary = {k: manifest[k] for k in ("version", "size", "seed", "num_utterances", "hours", "text_stats")}
    logging.info("corpus ready in %s (%.1f s): %s", args.out, time.time() - start,
                 json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
