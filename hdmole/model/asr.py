"""LLMASR: Whisper encoder -> frame-concat projector -> Qwen2-family LLM.

Training teacher-forces the answer: the LLM input is [prompt with speech][answer] and the labels
are the same tokens shifted by one, -100 everywhere except the answer and its EOS (llm.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hdmole.batch import Batch
from hdmole.model.config import ModelConfig
from hdmole.model.ctc_units import make_ctc_units
from hdmole.model.decoding import StoppingRules, beam_search, greedy_search, make_stepper
from hdmole.model.encoder import SpeechEncoder, load_whisper_encoder
from hdmole.model.encoder_cache import EncoderOutputCache
from hdmole.model.llm import IGNORE_INDEX, PromptBuilder, load_llm, load_tokenizer, training_attention_mask
from hdmole.model.projector import FrameConcatProjector
from hdmole.model.specaug import spec_augment
from hdmole.tensors import copy_named_tensors

log = logging.getLogger(__name__)

FRAMES_PER_SECOND = 100  # Batch contract: log-mel at 100 frames/s
TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "model_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype {name!r} unknown; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass or an OmegaConf node as a plain dict."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _enable_checkpointing(model: nn.Module) -> None:
    # transformers 5.2x renamed gradient_checkpointing_enable (deprecated) to activation_...
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class ASROutput:
    loss: torch.Tensor
    asr_loss: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # logged, not optimised
    num_answer_tokens: int = 0


class LLMASR(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: SpeechEncoder, llm: nn.Module, prompts: PromptBuilder,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.llm = llm
        self.prompts = prompts
        self.compute_dtype = compute_dtype
        llm_dim = llm.config.get_text_config().hidden_size
        hidden = cfg.projector_hidden or llm_dim
        self.projector = FrameConcatProjector(encoder.dim, llm_dim, cfg.projector_downsample, hidden)
        vocab = llm.get_output_embeddings().weight.shape[0]
        self.ctc_units = make_ctc_units(cfg.ctc_units, prompts.tokenizer, vocab, prompts.pad_id)
        self.ctc_head = nn.Linear(encoder.dim, self.ctc_units.size) if cfg.ctc_weight > 0 else None
        self.adapter: nn.Module | None = None
        self.adapter_cfg: Any = None
        # Frozen-encoder outputs by utterance id (use_encoder_cache); None = always encode.
        self.encoder_cache: EncoderOutputCache | None = None
        self.num_accents = 0
        self.to(llm.device)
        self.apply_freezing()
        if cfg.gradient_checkpointing:
            # The projector's gradient flows back through the LLM even when it is frozen.
            _enable_checkpointing(self.llm)
            if not cfg.freeze_encoder:
                _enable_checkpointing(self.encoder.whisper)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device | None = None) -> "LLMASR":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        compute = resolve_dtype(cfg.dtype, device)
        # Frozen parts are stored in the compute dtype; trainable ones stay float32 (autocast).
        enc_dtype = compute if cfg.freeze_encoder else torch.float32
        llm_dtype = compute if cfg.freeze_llm else torch.float32
        whisper = load_whisper_encoder(cfg.encoder_dir, enc_dtype, cfg.attn_implementation).to(device)
        encoder = SpeechEncoder(whisper, cfg.pad_to_30s, cfg.pad_to_30s_keep_padding)
        llm = load_llm(cfg.llm_dir, llm_dtype, cfg.attn_implementation).to(device)
        prompts = PromptBuilder(load_tokenizer(cfg.llm_dir), cfg.instruction, cfg.eos_token)
        return cls(cfg, encoder, llm, prompts, compute)

    def apply_freezing(self) -> None:
        self.encoder.requires_grad_(not self.cfg.freeze_encoder)
        self.encoder.whisper.embed_positions.requires_grad_(False)  # fixed sinusoids in Whisper
        self.llm.requires_grad_(not self.cfg.freeze_llm)
        if self.adapter is None:
            self.projector.requires_grad_(not self.cfg.freeze_projector)

    def attach_adapter(self, adapter_cfg: Any, num_accents: int) -> nn.Module:
        """Wrap the projector's linears with `hdmole.adapters` (base weights frozen by inject)."""
        from hdmole.adapters import inject

        self.adapter = inject(self.projector, adapter_cfg, num_accents=num_accents, accent_feature_dim=self.encoder.dim)
        self.adapter.to(self.device)
        self.adapter_cfg = adapter_cfg
        self.num_accents = num_accents
        return self.adapter

    def train(self, mode: bool = True) -> "LLMASR":
        super().train(mode)
        # Frozen modules stay in eval mode (no dropout), as in SLAM-LLM.
        if self.cfg.freeze_encoder:
            self.encoder.eval()
        if self.cfg.freeze_llm:
            self.llm.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def num_mel_bins(self) -> int:
        return self.encoder.num_mel_bins

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def use_encoder_cache(self, cache: EncoderOutputCache) -> None:
        """Take encoder outputs from `cache` where it has every utterance of a batch. Only
        exact when the encoder cannot change them: frozen and without SpecAugment."""
        if not self.cfg.freeze_encoder or self.cfg.specaug_freq_masks or self.cfg.specaug_time_masks:
            raise ValueError("an encoder-output cache needs model.freeze_encoder=true and no SpecAugment "
                             "(model.specaug_*_masks=0); set data.encoder_cache_dir=null")
        self.encoder_cache = cache

    # ---- forward pieces -----------------------------------------------------------------
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder_cache is not None:
            cached = self.encoder_cache.lookup(batch.ids, self.device)
            if cached is not None:
                return cached
        features = batch.features.to(self.device)
        lens = batch.feature_lens.to(self.device)
        if self.training:
            features = spec_augment(features, lens, self.cfg)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_encoder):
            return self.encoder(features, lens)

    def project(self, enc: torch.Tensor, enc_lens: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech tokens (B, N, llm_dim) and their valid counts; adapters route inside."""
        if self.adapter is None:
            speech, n_speech = self.projector(enc, enc_lens)
        else:
            enc_mask = torch.arange(enc.shape[1], device=enc.device)[None, :] < enc_lens[:, None]
            n_tokens = enc_lens // self.projector.k
            token_mask = torch.arange(enc.shape[1] // self.projector.k, device=enc.device)[None, :] < n_tokens[:, None]
            accents = batch.accents.to(enc.device)
            labels = accents if bool((accents >= 0).any()) else None
            with self.adapter.routing(enc, enc_mask, accent_labels=labels, token_mask=token_mask):
                speech, n_speech = self.projector(enc, enc_lens)
        if bool((n_speech < 1).any()):
            short = [batch.ids[i] for i in (n_speech < 1).nonzero().flatten().tolist()]
            raise ValueError(f"utterances too short for one speech token (k={self.projector.k}): {short[:5]}")
        return speech, n_speech

    def _embed(self, layout, speech: torch.Tensor, n_speech: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(layout.token_ids.to(self.device))
        valid = torch.arange(speech.shape[1], device=speech.device)[None, :] < n_speech[:, None]
        embeds = embeds.clone()
        embeds[layout.speech_mask.to(self.device)] = speech[valid].to(embeds.dtype)
        return embeds

    def forward(self, batch: Batch, encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> ASROutput:
        """Losses for a batch. `encoded`: this batch's `encode(batch)` output computed earlier
        (a frozen encoder's outputs can be cached across epochs)."""
        if not batch.texts:
            raise ValueError("training forward needs Batch.texts (reference transcripts)")
        with self._autocast():
            enc, enc_lens = encoded if encoded is not None else self.encode(batch)
            out = ASROutput(loss=enc.new_zeros((), dtype=torch.float32))
            answers = [self.prompts.answer_ids(t) for t in batch.texts]
            if self.ctc_head is not None:
                out.ctc_loss = self._ctc_loss(enc, enc_lens, [self.ctc_units.encode(t) for t in batch.texts])
                out.loss = out.loss + self.cfg.ctc_weight * out.ctc_loss
            if self.cfg.asr_weight > 0:
                speech, n_speech = self.project(enc, enc_lens, batch)
                layout = self.prompts.layout(n_speech.tolist(), answers)
                embeds = self._embed(layout, speech, n_speech)
                mask = training_attention_mask(self.llm, layout.attention_mask, self.device)
                hidden = self.llm.get_decoder()(
                    inputs_embeds=embeds, attention_mask=mask,
                    position_ids=layout.position_ids.to(self.device), use_cache=False).last_hidden_state
                labels = layout.labels[:, 1:].to(self.device)
                predict = labels != IGNORE_INDEX
                # Project only the answer positions to the vocabulary (a 7B vocab is 152k wide).
                logits = self.llm.get_output_embeddings()(hidden[:, :-1][predict]).float()
                out.asr_loss = nn.functional.cross_entropy(logits, labels[predict])
                out.num_answer_tokens = int(predict.sum())
                out.loss = out.loss + self.cfg.asr_weight * out.asr_loss
        if self.adapter is not None and self.cfg.asr_weight > 0:
            out.aux_losses = dict(self.adapter.auxiliary_losses())
            for value in out.aux_losses.values():
                out.loss = out.loss + value
            out.metrics = dict(self.adapter.batch_metrics())
        return out

    def _ctc_loss(self, enc: torch.Tensor, enc_lens: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        logp = torch.log_softmax(self.ctc_head(enc).float(), dim=-1).transpose(0, 1)
        flat = torch.tensor([t for row in targets for t in row], dtype=torch.long, device=enc.device)
        target_lens = torch.tensor([len(row) for row in targets], dtype=torch.long, device=enc.device)
        loss = nn.functional.ctc_loss(logp, flat, enc_lens, target_lens, blank=self.ctc_units.blank,
                                      reduction="sum", zero_infinity=True)
        return loss / target_lens.sum().clamp(min=1)

    # ---- decoding -----------------------------------------------------------------------
    def max_new_tokens_for(self, feature_lens: torch.Tensor, max_new_tokens: int,
                           max_tokens_per_second: float | None) -> torch.Tensor:
        """Per-utterance bound: min(max_new_tokens, ceil(seconds * rate) + 4)."""
        bound = torch.full_like(feature_lens, max_new_tokens)
        if max_tokens_per_second:
            per_audio = torch.ceil(feature_lens.double() / FRAMES_PER_SECOND * max_tokens_per_second).long() + 4
            bound = torch.minimum(bound, per_audio)
        return bound

    @torch.no_grad()
    def transcribe(self, batch: Batch, num_beams: int = 1, max_new_tokens: int = 200,
                   max_tokens_per_second: float | None = 12.0, max_repeats: int = 4,
                   repeat_max_ngram: int = 4, length_penalty: float = 1.0,
                   decode_backend: str = "auto") -> dict[str, str]:
        """Hypotheses keyed by utterance id (greedy when num_beams == 1).

        New tokens per utterance: at most min(max_new_tokens, ceil(seconds * max_tokens_per_second)
        + 4). A hypothesis whose tail is one n-gram (n <= repeat_max_ngram) repeated max_repeats
        times ends there (0 disables). decode_backend: see decoding.make_stepper.
        """
        was_training = self.training
        self.eval()
        try:
            with self._autocast():
                enc, enc_lens = self.encode(batch)
                speech, n_speech = self.project(enc, enc_lens, batch)
                layout = self.prompts.layout(n_speech.tolist())
                embeds = self._embed(layout, speech, n_speech)
            embeds = embeds.to(self.llm.dtype)
            rules = StoppingRules(
                self.prompts.eos_id, self.prompts.pad_id,
                self.max_new_tokens_for(batch.feature_lens, max_new_tokens, max_tokens_per_second).to(self.device),
                max_repeats, repeat_max_ngram)
            stepper = make_stepper(self.llm, decode_backend, int(rules.max_new_tokens.max()) + 1)
            args = (stepper, embeds, layout.attention_mask.to(self.device),
                    layout.position_ids.to(self.device), rules)
            rows = greedy_search(*args) if num_beams == 1 else beam_search(*args, num_beams, length_penalty)
        finally:
            self.train(was_training)
        return {utt: self.prompts.decode(row) for utt, row in zip(batch.ids, rows)}

    def ctc_reference(self, text: str) -> str:
        """`text` in the form ctc_transcribe returns (itself, or numbered pinyin syllables)."""
        return self.ctc_units.reference(text)

    @torch.no_grad()
    def ctc_transcribe(self, batch: Batch) -> dict[str, str]:
        """Greedy CTC decoding of the encoder head (monitoring encoder pre-training); compare
        with `ctc_reference(text)`."""
        if self.ctc_head is None:
            raise ValueError("ctc_transcribe needs model.ctc_weight > 0 (no CTC head)")
        with self._autocast():
            enc, enc_lens = self.encode(batch)
            best = self.ctc_head(enc).argmax(-1).tolist()
        hyps = {}
        for utt, row, n in zip(batch.ids, best, enc_lens.tolist()):
            blank = self.ctc_units.blank
            tokens = [t for i, t in enumerate(row[:n]) if t != blank and (i == 0 or t != row[i - 1])]
            hyps[utt] = self.ctc_units.decode(tokens)
        return hyps

    # ---- trainable-only checkpoints -----------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every parameter that trains, plus the whole projector, CTC
        head and adapter (parameters and buffers). Those are not in the pre-trained Hugging Face
        directories, so a checkpoint plus the two directories always rebuilds the model."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        for prefix, module in (("projector.", self.projector), ("ctc_head.", self.ctc_head), ("adapter.", self.adapter)):
            if module is not None:
                state.update({prefix + n: t.detach() for n, t in module.state_dict(keep_vars=True).items()})
        return state

    def save_trainable(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        save_file(state, str(directory / TRAINABLE_FILE))
        meta = {"model": config_to_dict(self.cfg), "num_accents": self.num_accents,
                "adapter": config_to_dict(self.adapter_cfg) if self.adapter_cfg is not None else None}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory

    def load_trainable(self, directory: str | Path, strict: bool = True) -> list[str]:
        """Load `save_trainable` output. strict: the checkpoint holds exactly what this model
        would save. strict=False (moving between training stages, e.g. a CTC-trained encoder
        into a model that now freezes it): any subset of the model's tensors; returns the keys
        this model would save that the checkpoint lacks. Attach adapters after loading a
        checkpoint saved without them, before loading one saved with them."""
        directory = Path(directory)
        path = directory / TRAINABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trainable checkpoint")
        saved = load_file(str(path), device=str(self.device))
        targets = {**dict(self.named_buffers()), **dict(self.named_parameters())}
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - (set(expected) if strict else set(targets)))
        if (strict and missing) or unexpected:
            raise ValueError(f"{path}: does not match this model (same model config and adapter? "
                             f"strict={strict}): missing {missing[:5]}, unexpected {unexpected[:5]}")
        meta_file = directory / CONFIG_FILE
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text(encoding="utf-8"))["model"]
            for key in ("encoder_dir", "llm_dir"):
                if meta.get(key) != getattr(self.cfg, key):
                    log.warning("%s was trained with %s=%s, this model uses %s", path, key, meta.get(key), getattr(self.cfg, key))
        copy_named_tensors(targets, saved, str(path))
        if missing:
            log.info("%s: %d tensors not in the checkpoint keep their current values: %s", path, len(missing), missing[:5])
        return missing

    @classmethod
    def from_saved(cls, directory: str | Path, device: str | torch.device | None = None) -> "LLMASR":
        """Rebuild a model from `save_trainable` output: its own config, adapter and weights."""
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        model = cls.from_config(ModelConfig(**meta["model"]), device)
        if meta.get("adapter") is not None:
            from hdmole.adapters.config import AdapterConfig

            model.attach_adapter(AdapterConfig(**meta["adapter"]), meta["num_accents"])
        model.load_trainable(directory)
        return model
