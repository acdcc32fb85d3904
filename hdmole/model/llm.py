"""Qwen2-family LLM and tokenizer loading, and the one prompt builder for training and decoding.

Sequence layout (one utterance, left-padded in a batch):

    [pad ...][chat prefix][speech tokens][chat suffix][answer tokens][eos]
     ^ masked  ^ labels -100 ..........................^ labels = next token

The chat prefix/suffix come from the tokenizer's own chat template rendered around a speech
placeholder, so a real Qwen tokenizer and the project's tiny one build prompts the same way.
Decoding feeds everything up to the chat suffix: it is a prefix of the training sequence.

Training hands SDPA a causal mask in which each left-pad query attends to itself
(`training_attention_mask`): with the stock mask those rows have no key at all, and CUDA's
memory-efficient SDPA backward can turn such rows into NaN gradients (forward finite).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          PreTrainedTokenizerFast)

SUPPORTED_LLM_TYPES = ("qwen2", "qwen3")
# Rendered into the chat template and split on; never tokenised.
SPEECH_PLACEHOLDER = "<|hdmole_speech|>"
IGNORE_INDEX = -100


def load_llm(path: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa") -> PreTrainedModel:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"llm directory {str(path)!r} has no config.json (missing or not a Hugging Face model dir)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_LLM_TYPES:
        raise ValueError(f"llm_dir {str(path)!r} holds a {model_type!r} model; expected one of {SUPPORTED_LLM_TYPES} (Qwen2 family)")
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, low_cpu_mem_usage=True, attn_implementation=attn_implementation)


# Tokenizers saved without a model-specific class (the project's tiny char-level one).
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer_config.json (the LLM directory must hold its tokenizer)")
    declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class", "")
    if declared in _GENERIC_TOKENIZER_CLASSES:
        # AutoTokenizer would map model_type qwen2 to Qwen2Tokenizer, whose constructor replaces
        # the saved pre-tokenizer with Qwen's byte-level one; load the file as saved instead.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer in {str(path)!r} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)")
    return tokenizer


@dataclass
class PromptLayout:
    """A left-padded batch of prompt sequences; speech embeddings go where `speech_mask` is True."""

    token_ids: torch.Tensor  # (B, L) int64; pad id under padding and speech positions
    speech_mask: torch.Tensor  # (B, L) bool
    attention_mask: torch.Tensor  # (B, L) int64, 0 on left padding
    position_ids: torch.Tensor  # (B, L) int64, counting from the first real token
    labels: torch.Tensor | None  # (B, L) int64, IGNORE_INDEX except answer + eos (training only)


class PromptBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, instruction: str, eos_token: str) -> None:
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.eos_id = _token_id(tokenizer, eos_token, "eos_token")
        pad = tokenizer.pad_token or "<|endoftext|>"
        self.pad_id = _token_id(tokenizer, pad, "pad token")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": SPEECH_PLACEHOLDER + instruction}],
            tokenize=False, add_generation_prompt=True)
        if rendered.count(SPEECH_PLACEHOLDER) != 1:
            raise ValueError("the chat template must render the user message exactly once")
        prefix, suffix = rendered.split(SPEECH_PLACEHOLDER)
        self.prefix_ids = self.encode(prefix)
        self.suffix_ids = self.encode(suffix)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(text) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def layout(self, num_speech: list[int], answers: list[list[int]] | None = None) -> PromptLayout:
        """Prompt (+ answer when training) for utterances with `num_speech[i]` speech tokens."""
        rows, speech_rows, label_rows = [], [], []
        for i, n in enumerate(num_speech):
            answer = answers[i] if answers is not None else []
            ids = self.prefix_ids + [self.pad_id] * n + self.suffix_ids + answer
            speech = [False] * len(self.prefix_ids) + [True] * n + [False] * (len(self.suffix_ids) + len(answer))
            prompt_len = len(ids) - len(answer)
            rows.append(ids)
            speech_rows.append(speech)
            label_rows.append([IGNORE_INDEX] * prompt_len + answer)
        length = max(len(r) for r in rows)
        b = len(rows)
        token_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        speech_mask = torch.zeros((b, length), dtype=torch.bool)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, speech, lab) in enumerate(zip(rows, speech_rows, label_rows)):
            start = length - len(ids)
            token_ids[i, start:] = torch.tensor(ids)
            speech_mask[i, start:] = torch.tensor(speech)
            attention_mask[i, start:] = 1
            labels[i, start:] = torch.tensor(lab)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return PromptLayout(token_ids, speech_mask, attention_mask, position_ids, labels if answers is not None else None)


def training_attention_mask(llm: PreTrainedModel, attention_mask: torch.Tensor,
                            device: torch.device) -> torch.Tensor | dict[str, torch.Tensor]:
    """The `attention_mask` argument (on `device`) for a training forward of a left-padded batch
    whose 2D mask (`PromptLayout.attention_mask`) is `attention_mask`.

    Under SDPA, transformers 5 turns the 2D mask into causal & key-is-real: a left-pad query row
    then has no key to attend to. SDPA kernels return 0 for such a row, but CUDA's memory-efficient
    backward can return NaN there (shape dependent), which flows into the embedding and
    projection gradients although the loss ignores those positions. Here a pad query attends to
    itself only; real rows are unchanged (no real query sees a pad key), so losses and gradients
    are the same. Other attention implementations get the 2D mask (eager adds a finite minimum;
    flash attention unpads).
    """
    if llm.config._attn_implementation != "sdpa" or bool(attention_mask.all()):
        return attention_mask.to(device)  # without padding transformers uses is_causal (flash kernel)
    layer_types = set(getattr(llm.config.get_text_config(), "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"training_attention_mask builds full causal masks only; this LLM has layers {sorted(layer_types)}")
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & attention_mask.to(device).bool()[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)[None]
    return {"full_attention": mask[:, None]}  # (B, 1, L, L), True = attend


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str, what: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
    return int(token_id)
