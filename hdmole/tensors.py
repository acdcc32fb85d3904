"""Copying named tensors into a model's parameters and buffers (checkpoints, exports, adapter
and trainable-weight files all do it). Depends on torch only, so any package may use it."""
from __future__ import annotations

from typing import Mapping

import torch


def copy_named_tensors(targets: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor],
                       source: str) -> None:
    """Copy every `values[name]` into `targets[name]` in place (no autograd; dtype and device
    are converted by `Tensor.copy_`). A name `targets` lacks or a shape that differs raises
    ValueError naming `source` (the file the values came from), the name and the shapes, before
    anything is copied. Checking that `values` covers all of `targets` is the caller's business."""
    unknown = [name for name in values if name not in targets]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensors not in the model, e.g. {unknown[:5]}")
    for name, value in values.items():
        if tuple(targets[name].shape) != tuple(value.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, "
                             f"the model has {tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, value in values.items():
            targets[name].copy_(value)
