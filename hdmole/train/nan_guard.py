"""Locate where a non-finite loss comes from: the first module whose output is not finite."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf; the message names the step and the first offending layer."""


def _tensors(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def first_nonfinite_module(model: nn.Module, run_forward: Callable[[], Any]) -> str | None:
    """Re-run the forward pass with hooks; return the qualified name of the first module (in
    execution order) whose output holds NaN/Inf, or None when the forward pass is finite."""
    found: list[str] = []
    handles = []

    def hook(name: str):
        def fn(module, inputs, output):
            if not found and any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(output)):
                found.append(name or type(module).__name__)
        return fn

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def first_nonfinite_grad(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None
