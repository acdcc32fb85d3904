"""ModelConfig: the `model:` section of the experiment config (conf/model/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass


# Default instruction of icefall's whisper_llm_zh recipe ("transcribe the audio into text").
DEFAULT_INSTRUCTION = "请转写音频为文字"
# OmegaConf's MISSING marker, spelt out so the model imports without omegaconf (GPU hosts).
MISSING = "???"


@dataclass
class ModelConfig:
    """Whisper encoder -> frame-concat projector -> Qwen2-family LLM.

    Every dimension is read from the loaded checkpoints; only design choices live here.
    """

    # Local Hugging Face directories (never a hub id: runs are offline).
    encoder_dir: str = MISSING  # full Whisper checkpoint or a saved WhisperEncoder
    llm_dir: str = MISSING  # Qwen2-family causal LM + tokenizer with a chat template

    # Which parts train. Adapters (attach_adapter) freeze the projector's base weights themselves.
    freeze_encoder: bool = True
    freeze_projector: bool = False
    freeze_llm: bool = True

    # SLAM-LLM "linear" projector: concatenate k encoder frames (50 fps -> 10 tokens/s at k=5),
    # Linear(D*k, hidden) - ReLU - Linear(hidden, llm_dim). hidden 0 means "the LLM's hidden size".
    projector_downsample: int = 5
    projector_hidden: int = 2048

    # False: variable-length encoder (positional table sliced to the batch, padding masked).
    # True: every utterance padded to Whisper's 30 s window as upstream does (see docs/model.md).
    pad_to_30s: bool = False
    # With pad_to_30s, feed all 30 s of encoder frames to the LLM (SLAM-LLM) or only the valid ones.
    pad_to_30s_keep_padding: bool = True

    # Prompt: one builder for training and decoding (hdmole.model.llm.PromptBuilder).
    instruction: str = DEFAULT_INSTRUCTION
    eos_token: str = "<|im_end|>"

    # Loss weights: ASR cross-entropy on answer tokens, and an optional CTC head on the encoder
    # over the LLM tokenizer's vocabulary (blank = pad token). asr_weight 0 skips projector + LLM
    # (encoder pre-training stage).
    asr_weight: float = 1.0
    ctc_weight: float = 0.0
    # CTC output units (hdmole.model.ctc_units): "tokens" (the LLM vocabulary; char CTC with the
    # tiny tokenizer) or "pinyin" (initials/finals/tones, 66 units: learns far faster).
    ctc_units: str = "tokens"

    # SpecAugment on the input log-mel while training (0 masks = off): masks of up to `width`
    # mel bins / frames, filled with the utterance mean; a time mask covers at most 20% of it.
    specaug_freq_masks: int = 0
    specaug_freq_width: int = 15
    specaug_time_masks: int = 0
    specaug_time_width: int = 40

    # "auto": bfloat16 on CUDA, float32 on CPU. Frozen parts are stored in this dtype, trainable
    # parts stay float32 and run under autocast.
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
