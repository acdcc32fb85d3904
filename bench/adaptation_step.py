#!/usr/bin/env python
"""Adaptation steps/s on the CPU with and without the frozen encoder's cached outputs
(data.encoder_cache_dir; hdmole.model.encoder_cache). Never part of the test run.

    python bench/adaptation_step.py exp/synthetic_default_tiny --adapter hdmole --threads 2 \\
        --out bench/results/adaptation_step_cpu.json

Needs a finished stage 2 (the base model) in that experiment root and stage 1's cut sets. Runs
the same `--steps` training steps (the same batches: the first ones of the seeded training
order) twice on one model copy each: encoding every batch, and reading the encoder outputs
from the cache (filled beforehand, not timed; its fill time is reported separately).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from hdmole.config import compose_config, to_object
from hdmole.experiment import TARGET, attach_encoder_cache, build_model, make_loader
from hdmole.train.distributed import DistInfo


def base_overrides(exp_root: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "hdmole.bin.pretrained", "base-overrides",
                          str(exp_root / "base_model")], capture_output=True, text=True, check=True)
    return out.stdout.split()


def timed_steps(model, batches, steps: int) -> float:
    """Seconds per training step (forward, backward, AdamW) after one warm-up step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for batch in batches[: steps + 1]:
        start = time.perf_counter()
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / len(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp_root", type=Path)
    ap.add_argument("--corpus", default="data/synthetic_default")
    ap.add_argument("--adapter", default="hdmole")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. model.dtype=bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.corpus
    overrides = ["model=tiny", "data=synthetic", f"data.corpus_dir={data}/corpus",
                 f"data.cuts_dir={data}/cuts", f"data.manifest_dir={data}/manifests",
                 f"data.feature_dir={data}/fbank", f"data.encoder_cache_dir={data}/encoder_out",
                 "data.num_workers=0", f"adapter={args.adapter}",
                 f"train.init_from={args.exp_root / 'base_model'}", *base_overrides(args.exp_root), *args.overrides]
    cfg = to_object(compose_config(overrides))
    train_path, dev_path = cfg.data.feature_cuts_path(TARGET, "train"), cfg.data.feature_cuts_path(TARGET, "dev")
    torch.manual_seed(0)
    model, _ = build_model(cfg, "cpu")
    batches = []
    for batch in make_loader(cfg, train_path, model.num_mel_bins, True, DistInfo()):
        batches.append(batch)
        if len(batches) > args.steps:
            break
    state = {k: v.clone() for k, v in model.state_dict().items()}
    encode = timed_steps(model, batches, args.steps)
    model.load_state_dict(state)
    start = time.perf_counter()
    attach_encoder_cache(cfg, model, [train_path, dev_path])
    fill = time.perf_counter() - start
    cached = timed_steps(model, batches, args.steps)
    result = {"adapter": args.adapter, "overrides": args.overrides, "threads": args.threads, "steps": args.steps,
              "utterances_per_batch": sum(len(b) for b in batches[1:]) / len(batches[1:]),
              "encode_s_per_step": encode, "cached_s_per_step": cached,
              "steps_per_s_encode": 1 / encode, "steps_per_s_cached": 1 / cached,
              "speedup": encode / cached, "cache_fill_or_load_s": fill,
              "cache_hits": model.encoder_cache.hits, "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor()}".strip()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
