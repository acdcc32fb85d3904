"""Tiny random checkpoints in Hugging Face layout, written by the project itself.

Nothing can be downloaded here, so tests and the default recipe load a tiny Whisper encoder and a
tiny Qwen2 (+ a character-level tokenizer over the corpus text, Qwen's special tokens and a
Qwen-style chat template) through exactly the `from_pretrained` path used for real checkpoints.
"""
from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from hdmole.model.config import DEFAULT_INSTRUCTION
from hdmole.model.llm import PromptBuilder, training_attention_mask

log = logging.getLogger(__name__)

PAD_TOKEN, IM_START, IM_END, UNK_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
# Qwen2's chat format without the default system turn (it would only lengthen tiny sequences).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEMPLATE_TEXT = "systemuserassistant\n"


@dataclass
class TinySizes:
    """Default sizes: encoder ~3.5 M, LLM ~4-5 M parameters (with the vocabulary); docs/model.md."""

    encoder_dim: int = 256
    encoder_layers: int = 4
    encoder_heads: int = 4
    encoder_ffn: int = 1024
    num_mel_bins: int = 80
    max_source_positions: int = 1500  # 30 s window, as real Whisper
    llm_dim: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_ffn: int = 1024
    llm_max_positions: int = 2048

    @classmethod
    def for_tests(cls) -> "TinySizes":
        """Smallest useful shapes: unit tests build and run these in about a second."""
        return cls(encoder_dim=64, encoder_layers=2, encoder_heads=4, encoder_ffn=128,
                   llm_dim=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_ffn=128, llm_max_positions=512)


# A few sentences for tests and demos when no corpus text is at hand.
SAMPLE_SENTENCES = ["今天天气很好。", "我们一起去学校吧。", "请把门关上。", "他说北京话。", "这个苹果多少钱？"]


@dataclass
class TinyCheckpoints:
    whisper_dir: Path
    llm_dir: Path


def build_char_tokenizer(sentences: list[str], instruction: str = DEFAULT_INSTRUCTION) -> PreTrainedTokenizerFast:
    """One token per character of the corpus, the instruction, the template and printable ASCII."""
    chars = set("".join(sentences)) | set(instruction) | set(_TEMPLATE_TEXT) | set(string.printable)
    vocab = {tok: i for i, tok in enumerate([UNK_TOKEN] + sorted(chars))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, IM_START, IM_END)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN, eos_token=IM_END)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def whisper_config(sizes: TinySizes) -> WhisperConfig:
    # transformers 5.x: special ids must be given explicitly for a config built from scratch.
    return WhisperConfig(
        d_model=sizes.encoder_dim, encoder_layers=sizes.encoder_layers,
        encoder_attention_heads=sizes.encoder_heads, encoder_ffn_dim=sizes.encoder_ffn,
        decoder_layers=1, decoder_attention_heads=sizes.encoder_heads, decoder_ffn_dim=sizes.encoder_ffn,
        num_mel_bins=sizes.num_mel_bins, max_source_positions=sizes.max_source_positions,
        vocab_size=64, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)


def qwen_config(sizes: TinySizes, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    vocab = -(-len(tokenizer) // 64) * 64  # round up for efficient matmuls; extra rows unused
    return Qwen2Config(
        vocab_size=vocab, hidden_size=sizes.llm_dim, num_hidden_layers=sizes.llm_layers,
        num_attention_heads=sizes.llm_heads, num_key_value_heads=sizes.llm_kv_heads,
        intermediate_size=sizes.llm_ffn, max_position_embeddings=sizes.llm_max_positions,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START), eos_token_id=tokenizer.eos_token_id)


def write_tiny_checkpoints(
    out_dir: str | Path,
    sentences: list[str],
    sizes: TinySizes | None = None,
    seed: int = 0,
    instruction: str = DEFAULT_INSTRUCTION,
    pretrain_steps: int = 0,
) -> TinyCheckpoints:
    """Write `<out>/whisper` (encoder + feature extractor) and `<out>/qwen` (LM + tokenizer)."""
    sizes = sizes or TinySizes()
    if not sentences:
        raise ValueError("write_tiny_checkpoints needs at least one corpus sentence for the tokenizer")
    out = Path(out_dir)
    torch.manual_seed(seed)
    whisper_dir, llm_dir = out / "whisper", out / "qwen"
    WhisperEncoder(whisper_config(sizes)).save_pretrained(whisper_dir)
    WhisperFeatureExtractor(feature_size=sizes.num_mel_bins).save_pretrained(whisper_dir)
    tokenizer = build_char_tokenizer(sentences, instruction)
    llm = Qwen2ForCausalLM(qwen_config(sizes, tokenizer))
    if pretrain_steps > 0:
        pretrain_text_lm(llm, PromptBuilder(tokenizer, instruction, IM_END), sentences, pretrain_steps, seed=seed)
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return TinyCheckpoints(whisper_dir, llm_dir)


def pretrain_text_lm(
    llm: Qwen2ForCausalLM,
    prompts: PromptBuilder,
    sentences: list[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Teach the tiny LM the corpus language: answers after an empty-speech prompt (no audio)."""
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    llm.train()
    losses = []
    for _ in tqdm(range(steps), desc="text pre-training", leave=False):
        idx = torch.randint(len(sentences), (min(batch_size, len(sentences)),), generator=gen).tolist()
        layout = prompts.layout([0] * len(idx), [prompts.answer_ids(sentences[i]) for i in idx])
        mask = training_attention_mask(llm, layout.attention_mask, llm.device)  # no key-less pad rows
        out = llm(input_ids=layout.token_ids, attention_mask=mask,
                  position_ids=layout.position_ids, labels=layout.labels)
        optim.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    llm.eval()
    log.info("text pre-training: loss %.3f -> %.3f over %d steps", losses[0], losses[-1], steps)
    return losses


def read_sentences(path: str | Path) -> list[str]:
    """One sentence per line; `utt_id<TAB>text` lines (Kaldi text files) give their text."""
    sentences = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.split("\t", 1)[-1].strip()
        if text:
            sentences.append(text)
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences
