#!/usr/bin/env python
"""Write tiny random Whisper + Qwen2 checkpoints (Hugging Face layout) from corpus text.

    local/make_tiny_checkpoints.py --text data/corpus/sentences.txt --out exp/tiny [--pretrain-steps 300]

Writes <out>/whisper (encoder + preprocessor config) and <out>/qwen (LM + char-level tokenizer
with Qwen special tokens and chat template), then reloads both offline as a check.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from hdmole.model.tiny import TinySizes, read_sentences, write_tiny_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="sentences, one per line (or Kaldi 'utt<TAB>text')")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=0, help="text-only LM pre-training steps (0: none)")
    for f in fields(TinySizes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sizes = TinySizes(**{f.name: getattr(args, f.name) for f in fields(TinySizes)})
    start = time.time()
    dirs = write_tiny_checkpoints(args.out, read_sentences(args.text), sizes, args.seed, pretrain_steps=args.pretrain_steps)
    # Reload through the same path as real checkpoints (offline) before declaring success.
    from hdmole.model import load_llm, load_tokenizer, load_whisper_encoder
    import torch

    load_whisper_encoder(dirs.whisper_dir, torch.float32)
    load_llm(dirs.llm_dir, torch.float32)
    tokenizer = load_tokenizer(dirs.llm_dir)
    record = {"command": " ".join(sys.argv), "sizes": asdict(sizes), "seed": args.seed,
              "pretrain_steps": args.pretrain_steps, "vocab": len(tokenizer), "seconds": round(time.time() - start, 1)}
    (Path(args.out) / "tiny_checkpoints.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    logging.info("wrote %s and %s (vocab %d)", dirs.whisper_dir, dirs.llm_dir, len(tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
