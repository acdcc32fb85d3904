"""Routing statistics accumulated over batches on the routing tensors' device (no host sync
per batch); `summary()` converts to plain JSON-serialisable Python. Padding tokens (valid = 0)
and utterances without a known accent are left out of everything they cannot belong to."""
from __future__ import annotations

import torch
from torch import Tensor


def _share(numerator: Tensor, denominator: Tensor) -> list:
    """Row-wise division; rows with no tokens become None (JSON null) instead of NaN."""
    out = []
    for num, den in zip(numerator.tolist(), denominator.tolist()):
        if den == 0:
            out.append(None)
        elif isinstance(num, list):
            out.append([v / den for v in num])
        else:
            out.append(num / den)
    return out


class LayerStatistics:
    """One adapted layer: number of active experts |S| (mean, histogram, shares of 1 and E),
    threshold, expert load, and per accent the mean routing weight of every expert.

    Everything is one float64 matrix S (accents + 1 "unknown" row) x (E+1 histogram bins,
    E weights, tau sum, token count), updated per call by one small matrix product: no
    host sync and a handful of kernels per layer call."""

    def __init__(self, num_experts: int, num_accents: int) -> None:
        self.num_experts = num_experts
        self.num_accents = num_accents
        self.reset()

    def reset(self) -> None:
        self._sums: Tensor | None = None
        self._has_tau = False

    @torch.no_grad()
    def record(self, w: Tensor, tau: Tensor | None, valid: Tensor,
               token_accents: Tensor | None) -> None:
        """w (N, E); tau scalar or (N, 1); valid (N,) in {0, 1}; token_accents (N,), -1 unknown."""
        e, a = self.num_experts, self.num_accents
        w = w.double()
        bins = torch.arange(e + 1, device=w.device)
        active_one_hot = (w > 0).sum(-1, keepdim=True) == bins
        tau_column = (tau.double().expand(w.shape[0], 1) if tau is not None
                      else w.new_zeros(w.shape[0], 1))
        self._has_tau = self._has_tau or tau is not None
        features = torch.cat([active_one_hot.double(), w, tau_column,
                              w.new_ones(w.shape[0], 1)], dim=1)
        rows = torch.arange(a + 1, device=w.device)
        if token_accents is None:
            accent_one_hot = (rows == a).double().expand(w.shape[0], a + 1)
        else:
            index = torch.where(token_accents >= 0, token_accents, a)
            accent_one_hot = (index.unsqueeze(-1) == rows).double()
        sums = (accent_one_hot * valid.double().unsqueeze(-1)).t() @ features
        self._sums = sums if self._sums is None else self._sums.to(sums.device) + sums

    def summary(self, current_tau: float | None) -> dict:
        e, a = self.num_experts, self.num_accents
        sums = (self._sums if self._sums is not None
                else torch.zeros(a + 1, 2 * e + 3, dtype=torch.float64)).cpu()
        total = sums.sum(0)
        tokens = float(total[-1])
        hist = total[:e + 1].tolist()
        sizes = torch.arange(e + 1, dtype=torch.float64)
        per_accent = sums[:a]
        accent_tokens = per_accent[:, -1]
        return {
            "tokens": tokens,
            "active_mean": float(total[:e + 1] @ sizes) / tokens if tokens else None,
            "active_histogram": hist,  # index k = number of tokens with |S| = k
            "share_one_active": hist[1] / tokens if tokens and e >= 1 else None,
            "share_all_active": hist[e] / tokens if tokens else None,
            "tau_current": current_tau,
            "tau_mean": float(total[2 * e + 1]) / tokens if tokens and self._has_tau else None,
            "expert_load": [v / tokens for v in total[e + 1:2 * e + 1].tolist()] if tokens else None,
            "accent_tokens": accent_tokens.tolist(),
            "accent_expert_weight": _share(per_accent[:, e + 1:2 * e + 1], accent_tokens),
            "accent_active_mean": _share(per_accent[:, :e + 1] @ sizes, accent_tokens),
            "accent_active_histogram": per_accent[:, :e + 1].tolist(),
        }


class GlobalRouterStatistics:
    """Accuracy and confusion matrix (rows: true accent, columns: arg-max of g)."""

    def __init__(self, num_accents: int) -> None:
        self.num_accents = num_accents
        self.reset()

    def reset(self) -> None:
        self._confusion: Tensor | None = None

    @torch.no_grad()
    def record(self, log_g: Tensor, labels: Tensor | None) -> None:
        if labels is None:
            return
        classes = torch.arange(self.num_accents, device=log_g.device)
        truth = (labels.unsqueeze(-1) == classes).double()  # unknown (-1): all-zero row
        guess = (log_g.argmax(-1, keepdim=True) == classes).double()
        counts = truth.t() @ guess
        self._confusion = (counts if self._confusion is None
                           else self._confusion.to(counts.device) + counts)

    def summary(self) -> dict:
        if self._confusion is None:
            return {"utterances": 0, "accuracy": None, "confusion": None}
        confusion = self._confusion.cpu()
        total = float(confusion.sum())
        correct = float(confusion.diagonal().sum())
        return {"utterances": total, "accuracy": correct / total if total else None,
                "confusion": confusion.long().tolist()}
