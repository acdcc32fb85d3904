#!/usr/bin/env python
"""Training-step and decoding throughput of LLMASR (never part of the test run).

    # tiny model on CPU (written to a temp dir by the tiny factory)
    python bench/model_throughput.py --scale tiny --out bench/results/model_throughput_tiny_cpu.json
    # paper scale on one GPU: random-init Whisper-large-v3-sized encoder + Qwen2-7B-sized LLM, bf16
    python bench/model_throughput.py --scale paper --out bench/results/model_throughput_paper_gpu.json

Rows: projector-only training step (forward + backward + AdamW) with variable-length input vs
every utterance padded to 30 s (SLAM-LLM), and greedy decoding tokens/s with the static-cache
stepper (CUDA graph on GPU), the generic DynamicCache stepper and Hugging Face `generate`.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from hdmole.batch import Batch
from hdmole.model import LLMASR, ModelConfig, PromptBuilder
from hdmole.model.decoding import StoppingRules, greedy_search, make_stepper
from hdmole.model.encoder import SpeechEncoder
from hdmole.model.tiny import SAMPLE_SENTENCES, TinySizes, build_char_tokenizer, write_tiny_checkpoints


@dataclass
class Scale:
    batch: int
    seconds: float
    decode_tokens: int
    train_steps: int
    decode_repeats: int


SCALES = {
    "tiny": Scale(batch=8, seconds=3.0, decode_tokens=20, train_steps=5, decode_repeats=3),
    "paper": Scale(batch=16, seconds=6.0, decode_tokens=40, train_steps=5, decode_repeats=3),
}


def paper_model(device: torch.device) -> LLMASR:
    """Whisper-large-v3-sized encoder + Qwen2-7B-sized LLM, random init, built on the device."""
    tokenizer = build_char_tokenizer(SAMPLE_SENTENCES)
    wcfg = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                         decoder_layers=1, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128,
                         max_source_positions=1500, vocab_size=51866, pad_token_id=50256, bos_token_id=50257,
                         eos_token_id=50257, decoder_start_token_id=50258)
    wcfg._attn_implementation = "sdpa"
    qcfg = Qwen2Config(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    qcfg._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            whisper = WhisperEncoder(wcfg)
            llm = Qwen2ForCausalLM(qcfg)
    finally:
        torch.set_default_dtype(default)
    cfg = ModelConfig(encoder_dir="<random>", llm_dir="<random>", projector_hidden=2048)
    prompts = PromptBuilder(tokenizer, cfg.instruction, cfg.eos_token)
    return LLMASR(cfg, SpeechEncoder(whisper), llm.eval(), prompts, torch.bfloat16)


def tiny_model(device: torch.device, workdir: Path) -> LLMASR:
    dirs = write_tiny_checkpoints(workdir, SAMPLE_SENTENCES, TinySizes())
    cfg = ModelConfig(encoder_dir=str(dirs.whisper_dir), llm_dir=str(dirs.llm_dir), projector_hidden=512)
    return LLMASR.from_config(cfg, device=device)


def make_batch(model: LLMASR, scale: Scale) -> Batch:
    rng = random.Random(0)
    frames = int(scale.seconds * 100)
    chars = [c for c in "".join(SAMPLE_SENTENCES) if c.strip()]
    texts = ["".join(rng.choice(chars) for _ in range(int(scale.seconds * 4))) for _ in range(scale.batch)]
    return Batch(ids=[f"u{i}" for i in range(scale.batch)],
                 features=torch.randn(scale.batch, model.num_mel_bins, frames),
                 feature_lens=torch.full((scale.batch,), frames), accents=torch.zeros(scale.batch, dtype=torch.long),
                 texts=texts)


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_train(model: LLMASR, batch: Batch, scale: Scale, device: torch.device) -> list[dict]:
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optim.step()

    model.train()
    for pad in (False, True):
        model.encoder.pad_to_30s = pad
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, scale.train_steps, device)
        with torch.no_grad():
            enc, lens = model.encode(batch)
        row = {"what": "train_step_projector", "input": "padded_30s" if pad else "variable_length",
               "batch": scale.batch, "audio_s": scale.seconds, "speech_tokens": int(lens[0]) // model.projector.k,
               "ms_per_step": round(seconds * 1000, 1)}
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        rows.append(row)
        print(row, flush=True)
    model.encoder.pad_to_30s = False
    rows[1]["speedup_variable_vs_padded"] = round(rows[1]["ms_per_step"] / rows[0]["ms_per_step"], 2)
    optim.zero_grad(set_to_none=True)
    del optim
    # The method's setting: HDMoLE experts on the projector's linears (defaults of AdapterConfig).
    from hdmole.adapters import AdapterConfig

    handle = model.attach_adapter(AdapterConfig(), num_accents=9)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    seconds = timed(step, scale.train_steps, device)
    row = {"what": "train_step_hdmole_adapter", "input": "variable_length", "batch": scale.batch,
           "audio_s": scale.seconds, "ms_per_step": round(seconds * 1000, 1),
           "trainable_params": sum(p.numel() for p in params),
           "projector_params": handle.trainable_report(model.projector).target_linear_parameters}
    rows.append(row)
    print(row, flush=True)
    optim.zero_grad(set_to_none=True)
    model.eval()
    return rows


@torch.no_grad()
def bench_decode(model: LLMASR, batch: Batch, scale: Scale, device: torch.device, batch_sizes: list[int]) -> list[dict]:
    rows = []
    n = scale.decode_tokens
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    for b in batch_sizes:
        sub = Batch(ids=batch.ids[:b], features=batch.features[:b], feature_lens=batch.feature_lens[:b],
                    accents=batch.accents[:b], texts=batch.texts[:b])
        with model._autocast():
            enc, lens = model.encode(sub)
            speech, n_speech = model.project(enc, lens, sub)
            layout = model.prompts.layout(n_speech.tolist())
            embeds = model._embed(layout, speech, n_speech).to(model.llm.dtype)
        am, pos = layout.attention_mask.to(device), layout.position_ids.to(device)
        # Exactly n tokens per row: EOS is an (unused) last vocabulary row, forced at step n.
        rules = StoppingRules(vocab - 1, model.prompts.pad_id, torch.full((b,), n, device=device), max_repeats=0)
        for backend in ("static", "dynamic"):
            produced, steppers = [], []

            def run() -> None:
                steppers.append(make_stepper(model.llm, backend, n + 1))
                out = greedy_search(steppers[-1], embeds, am, pos, rules)
                produced.append(sum(len(r) for r in out))

            seconds = timed(run, scale.decode_repeats, device)
            row = {"what": "greedy_decode", "backend": backend, "batch": b, "new_tokens": n,
                   "tokens_per_s": round(produced[-1] / seconds, 1), "ms_per_call": round(seconds * 1000, 1),
                   "path": getattr(steppers[-1], "path", "generic")}
            rows.append(row)
            print(row, flush=True)

        def hf_generate() -> None:
            out = model.llm.generate(inputs_embeds=embeds, attention_mask=am, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, num_beams=1, pad_token_id=model.prompts.pad_id)
            produced.append(out.shape[0] * n)

        produced = []
        try:
            seconds = timed(hf_generate, scale.decode_repeats, device)
            row = {"what": "greedy_decode", "backend": "hf_generate", "batch": b, "new_tokens": n,
                   "tokens_per_s": round(produced[-1] / seconds, 1), "ms_per_call": round(seconds * 1000, 1)}
        except Exception as err:  # a reference only; report why it did not run
            row = {"what": "greedy_decode", "backend": "hf_generate", "batch": b, "error": repr(err)[:300]}
        rows.append(row)
        print(row, flush=True)
    return rows


@torch.no_grad()
def check_static_stepper(model: LLMASR, batch: Batch, device: torch.device, steps: int = 8) -> dict:
    """The fast stepper against the generic one at this scale: logits over `steps` greedy steps."""
    from hdmole.model.decoding import LMStepper, StaticLMStepper

    with model._autocast():
        enc, lens = model.encode(batch)
        speech, n_speech = model.project(enc, lens, batch)
        layout = model.prompts.layout(n_speech.tolist())
        embeds = model._embed(layout, speech, n_speech).to(model.llm.dtype)
    args = (embeds, layout.attention_mask.to(device), layout.position_ids.to(device))
    generic, fast = LMStepper(model.llm), StaticLMStepper(model.llm, steps + 1)
    a, b = generic.prefill(*args), fast.prefill(*args)
    worst, agree = 0.0, []
    for _ in range(steps):
        token = a.argmax(-1)
        agree.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
        worst = max(worst, float((a.float() - b.float()).abs().max() / a.float().abs().max()))
        a, b = generic.step(token), fast.step(token)
    row = {"what": "check_static_vs_dynamic_logits", "batch": len(batch), "steps": steps, "fast_path": fast.path,
           "max_rel_diff": round(worst, 5), "argmax_agreement": round(sum(agree) / len(agree), 4)}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: stable on a shared machine; 2 threads under load were 6x slower)")
    parser.add_argument("--out", required=True, help="JSON file for the table")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scale = SCALES[args.scale]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = paper_model(device) if args.scale == "paper" else tiny_model(device, Path(tmp))
    build_s = time.perf_counter() - start
    batch = make_batch(model, scale)
    meta = {"scale": args.scale, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{args.threads}",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "params": {part: sum(p.numel() for p in getattr(model, part).parameters())
                       for part in ("encoder", "projector", "llm")},
            "build_s": round(build_s, 1), "command": " ".join(sys.argv)}
    print(meta, flush=True)
    rows = [check_static_stepper(model, batch, device)]
    rows += bench_train(model, batch, scale, device)
    rows += bench_decode(model, batch, scale, device, sorted({1, scale.batch}))
    meta["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"{'what':22} {'input/backend':16} {'batch':>5} {'ms':>9} {'tok/s':>9}")
    for r in rows[1:]:
        print(f"{r['what']:22} {r.get('input', r.get('backend', '')):16} {r['batch']:>5} "
              f"{r.get('ms_per_step', r.get('ms_per_call', '')):>9} {r.get('tokens_per_s', ''):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
