"""Save/load of the adapter's own weights (safetensors + JSON config) and per-accent merge."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hdmole.tensors import copy_named_tensors

from .config import AdapterConfig
from .inject import AdapterHandle

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1


def save_adapter(handle: AdapterHandle, directory: str | Path) -> Path:
    """Write the adapter weights (not the frozen base) and the config needed to check them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu()
               for name, p in handle.trainable_parameters().items()}
    if tensors:
        save_file(tensors, str(directory / WEIGHTS_FILE))
    meta = {"format": FORMAT_VERSION, "config": handle.cfg.to_dict(),
            "num_accents": handle.resolved.num_accents,
            "accent_feature_dim": handle.accent_feature_dim,
            "tensors": {name: list(t.shape) for name, t in tensors.items()}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def load_adapter_config(directory: str | Path) -> tuple[AdapterConfig, int, int]:
    """(config, num_accents, accent_feature_dim) as saved, to rebuild a handle with inject()."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    return AdapterConfig.from_dict(meta["config"]), meta["num_accents"], meta["accent_feature_dim"]


def load_adapter(handle: AdapterHandle, directory: str | Path) -> None:
    """Copy saved adapter weights into an injected handle; the configs must agree and the
    tensor names and shapes must match exactly (errors name the differing keys)."""
    directory = Path(directory)
    cfg, num_accents, _ = load_adapter_config(directory)
    saved, current = cfg.to_dict(), handle.cfg.to_dict()
    differ = sorted(k for k in current if saved.get(k) != current[k])
    if differ or num_accents != handle.resolved.num_accents:
        detail = {k: (saved.get(k), current[k]) for k in differ}
        raise ValueError(f"{directory / CONFIG_FILE}: saved adapter differs from this one "
                         f"(saved, current): {detail}, num_accents "
                         f"{num_accents} vs {handle.resolved.num_accents}")
    params = handle.trainable_parameters()
    weights_path = directory / WEIGHTS_FILE
    tensors = load_file(str(weights_path)) if params else {}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing}, unexpected {unexpected}")
    copy_named_tensors(params, tensors, str(weights_path))


def merge(handle: AdapterHandle, accent_id: int | None = None,
          inplace: bool = False) -> dict[str, nn.Linear]:
    """Fold the adapter into plain nn.Linear layers: W = W0 + (alpha/r) sum_i w_i B_i A_i.

    Only input-independent routing can be folded: `lora` (accent_id ignored) and label-routed
    `mole` (global_router='oracle', combine='global'), where w is the selection applied to
    the one-hot posterior of `accent_id`. Returns {layer name: merged Linear}; with
    `inplace=True` the merged layers also replace the wrappers in the injected module (the
    handle must not be used afterwards)."""
    cfg = handle.cfg
    if cfg.method not in ("lora", "mole"):
        raise ValueError(f"merge needs adapter layers; method={cfg.method!r} has none")
    if cfg.method == "mole":
        if not (cfg.global_router == "oracle" and cfg.combine == "global"):
            raise ValueError("merge needs label-routed experts (global_router='oracle', "
                             f"combine='global'); got global_router={cfg.global_router!r}, "
                             f"combine={cfg.combine!r}: their routing depends on the input")
        if accent_id is None or not 0 <= accent_id < handle.resolved.num_accents:
            raise ValueError(f"merge: accent_id={accent_id} not in "
                             f"[0, {handle.resolved.num_accents})")
    merged: dict[str, nn.Linear] = {}
    for name, layer in handle.layers.items():
        base = layer.base
        if layer.selection is None:
            weights = torch.ones(1)
        else:
            one_hot = torch.zeros(1, layer.num_experts)
            one_hot[0, accent_id] = 1.0
            with torch.no_grad():
                weights, _ = layer.selection(one_hot.to(base.weight.device), None)
            weights = weights[0]
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = layer.delta_weight(weights).to(base.weight.device)
            linear.weight.copy_((base.weight.double() + delta).to(base.weight.dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        linear.requires_grad_(False)
        merged[name] = linear
        if inplace:
            handle.root.set_submodule(name, linear)
    return merged
