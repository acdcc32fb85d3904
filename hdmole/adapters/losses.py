"""Auxiliary losses of the routers. Unweighted here; AdapterHandle applies the lambdas.

Token tensors are flat: p, w (N, E), logits (N, E), valid (N,) float in {0, 1}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accent_cross_entropy(log_g: Tensor, labels: Tensor | None) -> Tensor | None:
    """Mean CE of the global router over utterances with a known label (label >= 0); 0 (with
    zero gradient) when none has one, so no host sync is needed; None without labels."""
    if labels is None:
        return None
    known = (labels >= 0).sum()
    # nll_loss skips label -1 (ignore_index); clamp maps any other negative label to it.
    total = F.nll_loss(log_g, labels.long().clamp_min(-1), ignore_index=-1, reduction="sum")
    return total / known.clamp_min(1).to(log_g.dtype)


def load_balance(p: Tensor, w: Tensor, valid: Tensor) -> Tensor:
    """Switch-style balance E * sum_i f_i * P_i over valid tokens of one layer call.

    P_i = mean_t p_ti (differentiable), f_i = mean_t w_ti (detached): the share of expert
    i's routing weight. With one active expert per token f is the Switch dispatch fraction;
    using weights instead of counts keeps the loss informative for dense and threshold
    routing (counts would make f constant for dense). 1 at uniform load, E at collapse."""
    n = valid.sum().clamp_min(1.0)
    m = valid.unsqueeze(-1)
    f = (w.detach() * m).sum(0) / n
    mean_p = (p * m).sum(0) / n
    return p.shape[-1] * (f * mean_p).sum()


def router_z_loss(logits: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid tokens of logsumexp(l)^2 (keeps local logits small in fp32/bf16)."""
    n = valid.sum().clamp_min(1.0)
    return (torch.logsumexp(logits, -1).square() * valid).sum() / n
