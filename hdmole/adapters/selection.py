"""Selection strategies: routing probabilities p (..., E) -> expert weights w (..., E).

All run in fp32 on the small routing tensors. The active set of a token is S = {i : w_i > 0}.
Every strategy keeps at least one expert active: dense/topk/topp by construction, the
thresholds because tau <= (1 - 1e-3)/E < max_i p_i (config.TAU_HEADROOM), so a token never
silently falls back to the base layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import AdapterConfig, ResolvedAdapter


class Selection(nn.Module):
    """Base class: forward maps p to (w, tau or None). `extra` is what the strategy reads from
    the layer's input (fused.input_rows: rows of the layer's down-projection, plus their
    bias), None for strategies that read nothing."""

    def __init__(self, cfg: AdapterConfig, resolved: ResolvedAdapter, in_features: int) -> None:
        super().__init__()
        self.num_experts = resolved.num_experts

    def threshold(self, extra: Tensor | None, dtype: torch.dtype) -> Tensor:
        """tau (scalar or (*tokens, 1)) of a threshold strategy."""
        raise NotImplementedError(f"{type(self).__name__} has no threshold")

    def forward(self, p: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Returns weights w (same shape as p) and tau (broadcastable to p[..., :1]) or None."""
        raise NotImplementedError

    def current_tau(self) -> float | None:
        """The layer's threshold now (None when per token or not a threshold strategy)."""
        return None


class DenseSelection(Selection):
    def forward(self, p: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return p, None


class TopKSelection(Selection):
    def __init__(self, cfg: AdapterConfig, resolved: ResolvedAdapter, in_features: int) -> None:
        super().__init__(cfg, resolved, in_features)
        self.k = cfg.top_k

    def forward(self, p: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor | None]:
        values, index = p.topk(self.k, dim=-1)
        values = values / values.sum(-1, keepdim=True)
        return torch.zeros_like(p).scatter(-1, index, values), None


class TopPSelection(Selection):
    """Smallest prefix of the sorted p whose cumulative sum reaches top_p; weights are p
    itself (not renormalised), as in the public top-p MoE routers."""

    def __init__(self, cfg: AdapterConfig, resolved: ResolvedAdapter, in_features: int) -> None:
        super().__init__(cfg, resolved, in_features)
        self.top_p = cfg.top_p

    def forward(self, p: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor | None]:
        sorted_p, order = p.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = mass_before < self.top_p  # the first expert always has 0 mass before it
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return p * keep, None


def threshold_weights(p: Tensor, tau: Tensor) -> Tensor:
    """w_i = (p_i - tau)_+ / sum_j (p_j - tau)_+.

    Needs tau < max_i p_i, which the resolved thresholds guarantee (they stay below
    TAU_HEADROOM / E <= max_i p_i). Subtracting tau makes weights vanish continuously at
    the boundary and gives tau a gradient; a token with one active expert gets weight 1
    (no gradient to tau or the router from it)."""
    excess = (p - tau).clamp_min(0.0)
    return excess / excess.sum(-1, keepdim=True)


class ThresholdSelection(Selection):
    """Threshold strategies: w = threshold_weights(p, threshold(extra)), the form whose
    routing backward is written out (fused.gate_forward / gate_backward)."""

    def forward(self, p: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor | None]:
        tau = self.threshold(extra, p.dtype)
        return threshold_weights(p, tau), tau


class FixedThresholdSelection(ThresholdSelection):
    def __init__(self, cfg: AdapterConfig, resolved: ResolvedAdapter, in_features: int) -> None:
        super().__init__(cfg, resolved, in_features)
        self.register_buffer("tau", torch.tensor(resolved.fixed_tau), persistent=False)
        # the same as a Python float: the fused layer's constant tau (no device read)
        self.tau_value = resolved.fixed_tau

    def threshold(self, extra: Tensor | None, dtype: torch.dtype) -> Tensor:
        return self.tau.to(dtype)

    def current_tau(self) -> float | None:
        return float(self.tau)


class LayerThresholdSelection(ThresholdSelection):
    """HDMoLE: one learned threshold per layer, tau = tau_max * sigmoid(theta)."""

    def __init__(self, cfg: AdapterConfig, resolved: ResolvedAdapter, in_features: int) -> None:
        super().__init__(cfg, resolved, in_features)
        self.tau_max = resolved.tau_max
        self.theta = nn.Parameter(torch.tensor(float(cfg.threshold_init)))

    def threshold(self, extra: Tensor | None, dtype: torch.dtype) -> Tensor:
        return self.tau_max * torch.sigmoid(self.theta.to(dtype))

    def current_tau(self) -> float | None:
        return float(self.tau_max * torch.sigmoid(self.theta.detach().float()))


class TokenThresholdSelection(ThresholdSelection):
    """AdaMoLE: tau(x) = tau_max * sigmoid(w . x + b) per token; w is one extra row of the
    layer's down-projection (fused.input_rows), so x is still read once."""

    def __init__(self, cfg: AdapterConfig, resolved: ResolvedAdapter, in_features: int) -> None:
        super().__init__(cfg, resolved, in_features)
        self.tau_max = resolved.tau_max
        self.weight = nn.Parameter(torch.randn(1, in_features) * cfg.router_init_std)
        self.bias = nn.Parameter(torch.full((1,), float(cfg.threshold_init)))

    def threshold(self, extra: Tensor | None, dtype: torch.dtype) -> Tensor:
        if extra is None:
            raise RuntimeError("token_threshold selection needs the threshold projection")
        return self.tau_max * torch.sigmoid(extra.to(dtype))


SELECTION_REGISTRY: dict[str, type[Selection]] = {
    "dense": DenseSelection,
    "topk": TopKSelection,
    "topp": TopPSelection,
    "fixed_threshold": FixedThresholdSelection,
    "threshold": LayerThresholdSelection,
    "token_threshold": TokenThresholdSelection,
}


def build_selection(cfg: AdapterConfig, resolved: ResolvedAdapter, in_features: int) -> Selection:
    return SELECTION_REGISTRY[cfg.selection](cfg, resolved, in_features)
