#!/usr/bin/env python
"""Paper-scale smoke run: Whisper-large-v3-sized encoder + Qwen2-7B-sized LLM (random init, bf16,
built on the GPU from configs), HDMoLE on the projector, a few training steps through the
project's Trainer and a batched decode. One command, < 3 min on one H100/H200:

    python bench/paper_scale_smoke.py --out bench/results/paper_scale_smoke_gpu.json
    python bench/paper_scale_smoke.py --tiny --out /tmp/smoke.json        # CPU, tiny model, seconds

Prints and writes: training step time, audio seconds per second, peak GPU memory, checkpoint
time and size (trainable-only, as the recipe saves them), decoding tokens/s. The model builders,
the synthetic batch and the timer are bench/model_throughput.py's.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_throughput as mt  # noqa: E402  (bench/ is not a package)

from hdmole.adapters.config import AdapterConfig  # noqa: E402
from hdmole.data.accents import ACCENTS  # noqa: E402
from hdmole.model.asr import _enable_checkpointing  # noqa: E402
from hdmole.train.config import TrainConfig  # noqa: E402
from hdmole.train.loop import LAST, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def adapter_config(preset: str) -> AdapterConfig:
    """conf/adapter/<preset>.yaml typed against the schema (a misspelt key fails)."""
    path = ROOT / "conf" / "adapter" / f"{preset}.yaml"
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AdapterConfig), OmegaConf.load(path)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def train_steps(model, batch, scale: mt.Scale, device: torch.device, exp_dir: Path, adapter: str) -> dict:
    """`scale.train_steps` optimiser steps of the project's Trainer (autocast, clipping, AdamW,
    scheduler) on one fixed batch, after one warm-up step; then one resumable checkpoint."""
    cfg = TrainConfig(max_steps=scale.train_steps + 1, warmup_steps=0, lr=1e-4, valid_every=0, device=str(device),
                      log_every=1)
    trainer = Trainer(model, cfg, exp_dir, lambda epoch: [batch])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    trainer._step([batch])  # warm-up: allocator, kernels, Adam states
    sync(device)
    times, losses = [], []
    for _ in range(scale.train_steps):
        start = time.perf_counter()
        values = trainer._step([batch])
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(round(values["loss"], 4))
    step_s = sorted(times)[len(times) // 2]
    start = time.perf_counter()
    trainer._save(LAST, full=True)
    save_s = time.perf_counter() - start
    model.eval()
    return {"what": f"train_step_{adapter}_projector", "batch": scale.batch, "audio_s_per_utt": scale.seconds,
            "ms_per_step": round(step_s * 1000, 1),
            "audio_s_per_s": round(scale.batch * scale.seconds / step_s, 1),
            "losses": losses, "peak_gib": peak_gib(device),
            "checkpoint_s": round(save_s, 2),
            "checkpoint_mib": round((exp_dir / "checkpoints" / LAST).stat().st_size / 2**20, 2)}


def decode(model, batch, scale: mt.Scale, device: torch.device) -> list[dict]:
    """The recipe's batched transcription once (utterances/s), then forced-length greedy decoding
    for tokens/s (bench/model_throughput.py's decode table)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # decoding's own peak, not training's
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        hyps = model.transcribe(batch, num_beams=1, max_new_tokens=scale.decode_tokens)
    sync(device)
    seconds = time.perf_counter() - start
    rows = [{"what": "transcribe", "batch": scale.batch, "utterances": len(hyps), "seconds": round(seconds, 2),
             "audio_s_per_s": round(scale.batch * scale.seconds / seconds, 1)}]
    print(rows[0], flush=True)
    rows += mt.bench_decode(model, batch, scale, device, [scale.batch])
    for row in rows:
        row["peak_gib"] = peak_gib(device)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (tests, no GPU needed)")
    parser.add_argument("--adapter", default="hdmole", help="conf/adapter preset on the projector")
    parser.add_argument("--batch", type=int, default=None, help="utterances per batch (default: the scale's)")
    parser.add_argument("--seconds", type=float, default=None, help="audio seconds per utterance")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--grad-ckpt", action="store_true",
                        help="activation checkpointing in the LLM (the projector's gradient flows through it)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (--tiny)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("paper scale needs a CUDA GPU; use --tiny on a CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scale = mt.SCALES["tiny" if args.tiny else "paper"]
    scale = replace(scale, batch=args.batch or scale.batch, seconds=args.seconds or scale.seconds,
                    train_steps=args.steps or scale.train_steps, decode_repeats=1 if args.tiny else 2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = mt.tiny_model(device, Path(tmp)) if args.tiny else mt.paper_model(device)
        build_s = time.perf_counter() - start
        model.attach_adapter(adapter_config(args.adapter), num_accents=len(ACCENTS))
        model.to(device)
        if args.grad_ckpt:  # as model.gradient_checkpointing does: the frozen encoder needs none
            _enable_checkpointing(model.llm)
        batch = mt.make_batch(model, scale)
        batch.accents = torch.arange(scale.batch) % len(ACCENTS)
        meta = {"scale": "tiny" if args.tiny else "paper", "adapter": args.adapter,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{args.threads}",
                "torch": torch.__version__, "python": platform.python_version(),
                "params": {part: sum(p.numel() for p in getattr(model, part).parameters())
                           for part in ("encoder", "projector", "llm")},
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "grad_ckpt": args.grad_ckpt, "build_s": round(build_s, 1), "command": " ".join(sys.argv)}
        print(meta, flush=True)
        rows = [train_steps(model, batch, scale, device, Path(tmp) / "exp", args.adapter)]
        print(rows[0], flush=True)
        rows += decode(model, batch, scale, device)
    meta["total_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    train = rows[0]
    tok = max((r["tokens_per_s"] for r in rows if "tokens_per_s" in r), default=None)
    print(f"step {train['ms_per_step']} ms | {train['audio_s_per_s']} audio s/s | peak {train['peak_gib']} GiB | "
          f"decode {tok} tokens/s (batch {scale.batch}) | total {meta['total_s']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
