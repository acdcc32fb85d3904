"""Whisper speech encoder with variable-length input.

The stock `transformers.WhisperEncoder.forward` accepts exactly 3000 mel frames (30 s) and
attends to the padding. `SpeechEncoder` reuses its weights and layers but runs its own forward:
the positional table is sliced to the batch length and padded frames are masked, so an
utterance gives the same outputs alone or in any batch. `pad_to_30s=True` restores upstream
behaviour (every utterance padded to the 30 s window, no mask).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# A checkpoint stores the encoder under one of these prefixes: full Whisper
# (WhisperForConditionalGeneration), WhisperModel, or a saved WhisperEncoder.
_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} directory {str(path)!r} has no config.json (missing or not a Hugging Face model dir)")
    return path


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)")


def _read_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors from any Whisper checkpoint layout, prefix stripped."""
    files = _safetensors_files(path)
    keys_by_file = {}
    for f in files:
        with safe_open(f, framework="pt") as reader:
            keys_by_file[f] = list(reader.keys())
    all_keys = {k for keys in keys_by_file.values() for k in keys}
    prefix = next((p for p in _ENCODER_PREFIXES if p + "conv1.weight" in all_keys), None)
    if prefix is None:
        raise ValueError(f"{path}: no Whisper encoder weights found (looked for conv1.weight under prefixes {_ENCODER_PREFIXES})")

    def wanted(key: str) -> bool:
        return key.startswith(prefix) and not (prefix == "" and key.startswith(("decoder.", "model.", "proj_out")))

    state = {}
    for f, keys in keys_by_file.items():
        with safe_open(f, framework="pt") as reader:
            state.update({k[len(prefix):]: reader.get_tensor(k) for k in keys if wanted(k)})
    return state


def encoder_mel_bins(path: str | Path) -> int:
    """Mel bins the Whisper checkpoint in `path` takes (80; 128 for large-v3): what the data
    side's features must have."""
    return WhisperConfig.from_pretrained(_require_dir(path, "encoder")).num_mel_bins


def load_whisper_encoder(path: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa") -> WhisperEncoder:
    """Build a WhisperEncoder from a local checkpoint without materialising the decoder."""
    path = _require_dir(path, "encoder")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "whisper":
        raise ValueError(f"encoder_dir {str(path)!r} holds a {model_type!r} model; expected a Whisper checkpoint (model_type 'whisper')")
    config = WhisperConfig.from_pretrained(path)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    state = _read_encoder_state(path)
    missing = set(encoder.state_dict()) - set(state)
    unexpected = set(state) - set(encoder.state_dict())
    if missing or unexpected:
        raise ValueError(f"{path}: encoder weights do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    encoder.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return encoder


def encoder_output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
    """Valid encoder frames for `mel_lengths` mel frames (conv2 has stride 2, padding 1, kernel 3)."""
    return (mel_lengths + 1) // 2


class SpeechEncoder(nn.Module):
    """(B, mels, T) log-mel + valid lengths -> (B, T', D) encoder states + valid lengths."""

    def __init__(self, whisper: WhisperEncoder, pad_to_30s: bool = False, keep_padding: bool = True) -> None:
        super().__init__()
        self.whisper = whisper
        self.pad_to_30s = pad_to_30s
        self.keep_padding = keep_padding

    @property
    def dim(self) -> int:
        return self.whisper.config.d_model

    @property
    def num_mel_bins(self) -> int:
        return self.whisper.config.num_mel_bins

    @property
    def window_frames(self) -> int:
        """Mel frames in Whisper's window (3000 = 30 s for real checkpoints)."""
        return 2 * self.whisper.config.max_source_positions

    def check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or features.shape[1] != self.num_mel_bins:
            raise ValueError(
                f"features have shape {tuple(features.shape)} but the Whisper encoder expects "
                f"(B, {self.num_mel_bins} mel bins, T); set the data pipeline's num_mel_bins to "
                f"{self.num_mel_bins} (model.num_mel_bins)")
        if features.shape[-1] > self.window_frames:
            raise ValueError(
                f"{features.shape[-1]} mel frames exceed the encoder's window of {self.window_frames} "
                f"frames ({self.window_frames / 100:.0f} s); filter or segment longer utterances")

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_features(features)
        w = self.whisper
        dtype = w.conv1.weight.dtype
        frames = torch.arange(features.shape[-1], device=features.device)
        valid = frames[None, :] < feature_lens[:, None]
        if self.pad_to_30s:
            x = _pad_like_whisper(features, valid, self.window_frames)
            out_lens = encoder_output_lengths(feature_lens)
        else:
            x = features * valid[:, None, :]
            out_lens = encoder_output_lengths(feature_lens)
        x = x.to(dtype)
        h = nn.functional.gelu(w.conv1(x))
        if not self.pad_to_30s:
            # Zero conv1 outputs past the end so conv2 sees what a lone utterance sees (zero padding).
            h = h * valid[:, None, :].to(h.dtype)
        h = nn.functional.gelu(w.conv2(h)).transpose(1, 2)
        t_out = h.shape[1]
        h = h + w.embed_positions.weight[:t_out].to(h.dtype)
        h = nn.functional.dropout(h, p=w.dropout, training=w.training)
        mask = None
        if not self.pad_to_30s and int(out_lens.min()) < t_out:
            key_valid = torch.arange(t_out, device=h.device)[None, :] < out_lens[:, None]
            mask = torch.zeros(key_valid.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~key_valid, torch.finfo(h.dtype).min)[:, None, None, :]
        for layer in w.layers:
            h = layer(h, mask)
            h = h[0] if isinstance(h, tuple) else h  # transformers < 5.2x returned a tuple
        h = w.layer_norm(h)
        if self.pad_to_30s and self.keep_padding:
            out_lens = torch.full_like(out_lens, t_out)
        return h, out_lens


def _pad_like_whisper(features: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Pad to the 30 s window with the value Whisper's extractor gives to zero audio.

    The extractor floors log-mel at (max - 8) before mapping x -> (x + 4) / 4, so silence maps to
    (normalised max) - 2 of that utterance: padding the audio or the features is then the same.
    """
    masked = features.masked_fill(~valid[:, None, :], float("-inf"))
    fill = masked.amax(dim=(1, 2)) - 2.0
    out = fill[:, None, None].expand(features.shape[0], features.shape[1], window).clone()
    t = features.shape[-1]
    out[:, :, :t] = torch.where(valid[:, None, :], features, out[:, :, :t])
    return out
