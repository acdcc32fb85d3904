"""LLM-based ASR: Whisper encoder -> frame-concat projector -> Qwen2-family LLM.

Knows no data pipeline beyond `hdmole.batch.Batch`.
"""
from hdmole.model.asr import LLMASR, ASROutput
from hdmole.model.config import DEFAULT_INSTRUCTION, ModelConfig
from hdmole.model.encoder import SpeechEncoder, encoder_output_lengths, load_whisper_encoder
from hdmole.model.llm import PromptBuilder, PromptLayout, load_llm, load_tokenizer
from hdmole.model.projector import FrameConcatProjector, projected_lengths

__all__ = [
    "ASROutput", "DEFAULT_INSTRUCTION", "FrameConcatProjector", "LLMASR", "ModelConfig", "PromptBuilder",
    "PromptLayout", "SpeechEncoder", "encoder_output_lengths", "load_llm", "load_tokenizer",
    "load_whisper_encoder", "projected_lengths",
]
