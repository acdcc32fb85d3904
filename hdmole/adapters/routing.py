"""Routers: the utterance-level global accent router and the per-layer combinations of its
posterior g with a layer's token-level local router logits l. All in fp32.

Global routers return log g (B, A): log-probabilities over the accent domains.
Combinations map (l, log g) to routing probabilities p (..., E).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig, ResolvedAdapter

# log of an excluded accent in oracle routing: finite so that beta * log g has no inf*0.
ORACLE_LOG_ZERO = -1.0e4


def masked_pool(features: Tensor, mask: Tensor | None, kind: str) -> Tensor:
    """Mean (and std) over the valid frames of (B, T, D) features -> (B, D) or (B, 2D), fp32.

    The masked sum accumulates in fp32 without an fp32 copy of a long bf16 encoder output."""
    if mask is None:
        if kind == "mean":  # every frame valid: one reduction
            return features.mean(1, dtype=torch.float32)
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    elif mask.shape != features.shape[:2]:
        raise ValueError(f"accent_feature_mask shape {tuple(mask.shape)} does not match "
                         f"accent_features {tuple(features.shape)}[:2]")
    # An utterance without valid frames (a collate bug) pools to zeros rather than NaN;
    # no check here, as it would cost a host sync per batch.
    count = mask.sum(1, keepdim=True, dtype=torch.float32).clamp_min(1.0)
    m = mask.unsqueeze(-1).to(features.dtype)
    mean = (features * m).sum(1, dtype=torch.float32) / count
    if kind == "mean":
        return mean
    x = features.float()
    var = (((x - mean.unsqueeze(1)) ** 2) * m.float()).sum(1) / count
    return torch.cat([mean, (var + 1e-5).sqrt()], dim=-1)


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()  # skips a no-op dispatch per call


class GlobalAccentRouter(nn.Module):
    """Pooled speech-encoder output -> LayerNorm -> Linear -> GELU -> Linear -> log-softmax."""

    def __init__(self, cfg: AdapterConfig, num_accents: int, feature_dim: int) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"accent_feature_dim={feature_dim} must be >= 1 for "
                             "global_router='learned'")
        self.pooling = cfg.global_pooling
        pooled_dim = feature_dim * (2 if self.pooling == "mean_std" else 1)
        self.norm = nn.LayerNorm(pooled_dim)
        self.hidden = nn.Linear(pooled_dim, cfg.global_hidden)
        self.out = nn.Linear(cfg.global_hidden, num_accents)

    def forward(self, features: Tensor | None, mask: Tensor | None,
                labels: Tensor | None) -> Tensor:
        if features is None:
            raise ValueError("global_router='learned' needs accent_features in routing(...)")
        pooled = masked_pool(features, mask, self.pooling)
        # fp32 whatever the model dtype: the router is tiny and its softmax feeds every layer.
        h = F.layer_norm(pooled, self.norm.normalized_shape, _fp32(self.norm.weight),
                         _fp32(self.norm.bias), self.norm.eps)
        h = F.gelu(F.linear(h, _fp32(self.hidden.weight), _fp32(self.hidden.bias)))
        return F.linear(h, _fp32(self.out.weight), _fp32(self.out.bias)).log_softmax(-1)


class OracleAccentRouter(nn.Module):
    """The true accent label as a one-hot posterior (upper bound; mergeable per accent)."""

    def __init__(self, num_accents: int) -> None:
        super().__init__()
        self.num_accents = num_accents

    def forward(self, features: Tensor | None, mask: Tensor | None,
                labels: Tensor | None) -> Tensor:
        message = ("global_router='oracle' needs an accent label in "
                   f"[0, {self.num_accents}) for every utterance")
        if labels is None:
            raise ValueError(f"{message}; got None")
        in_range = ((labels >= 0) & (labels < self.num_accents)).all()
        if labels.is_cuda:  # checked on the device: a host-side check would sync per batch
            torch._assert_async(in_range, message)
        elif not bool(in_range):
            raise ValueError(f"{message}; got {labels}")
        classes = torch.arange(self.num_accents, device=labels.device)
        one_hot = labels.long().unsqueeze(-1) == classes  # F.one_hot checks (and syncs) on CUDA
        log_g = torch.full(one_hot.shape, ORACLE_LOG_ZERO, device=labels.device)
        return log_g.masked_fill(one_hot, 0.0)


def build_global_router(cfg: AdapterConfig, resolved: ResolvedAdapter,
                        feature_dim: int) -> nn.Module | None:
    if cfg.method != "mole" or cfg.global_router == "none":
        return None
    if cfg.global_router == "oracle":
        return OracleAccentRouter(resolved.num_accents)
    return GlobalAccentRouter(cfg, resolved.num_accents, feature_dim)


class Combination(nn.Module):
    """(local logits l or None, log g or None) -> p. `needs_local`: whether the layer has a
    local router (E rows in its fused down-projection)."""

    needs_local = True
    # p = softmax(l + beta * log g) (`beta` attribute) or softmax(l) (none): the form the
    # fused routing (fused.gate_forward / gate_backward) computes with a hand-written backward.
    softmax_of_logits = False

    def forward(self, logits: Tensor | None, log_g: Tensor | None) -> Tensor:
        raise NotImplementedError


class PriorCombination(Combination):
    """p = softmax(l + beta * log g): the accent posterior is a prior on the local choice."""

    softmax_of_logits = True

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        beta = torch.tensor(float(cfg.beta))
        if cfg.learn_beta:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta, persistent=False)

    def forward(self, logits: Tensor | None, log_g: Tensor | None) -> Tensor:
        assert logits is not None and log_g is not None
        return (logits + self.beta.to(logits.dtype) * log_g).softmax(-1)


class SumCombination(Combination):
    """p = gamma * g + (1 - gamma) * softmax(l)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.gamma = cfg.gamma

    def forward(self, logits: Tensor | None, log_g: Tensor | None) -> Tensor:
        assert logits is not None and log_g is not None
        return self.gamma * log_g.exp() + (1.0 - self.gamma) * logits.softmax(-1)


class LocalCombination(Combination):
    """p = softmax(l): per-layer routing only (no hierarchy)."""

    softmax_of_logits = True

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()

    def forward(self, logits: Tensor | None, log_g: Tensor | None) -> Tensor:
        assert logits is not None
        return logits.softmax(-1)


class GlobalCombination(Combination):
    """p = g for every token: utterance-level routing, no local router (oracle_accent)."""

    needs_local = False

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()

    def forward(self, logits: Tensor | None, log_g: Tensor | None) -> Tensor:
        assert log_g is not None
        return log_g.exp()


COMBINATION_REGISTRY: dict[str, type[Combination]] = {
    "prior": PriorCombination,
    "sum": SumCombination,
    "local": LocalCombination,
    "global": GlobalCombination,
}


def build_combination(cfg: AdapterConfig) -> Combination:
    return COMBINATION_REGISTRY[cfg.combine](cfg)
