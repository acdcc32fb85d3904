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
    threshold, expert load, and per accent the mean routing weight of every expert."""

    def __init__(self, num_experts: int, num_accents: int) -> None:
        self.num_experts = num_experts
        self.num_accents = num_accents
        self.reset()

    def reset(self) -> None:
        self._acc: dict[str, Tensor] | None = None
        self._tau_tokens = 0.0

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        e, a = self.num_experts, self.num_accents
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return {"tokens": z(()), "active_hist": z(e + 1), "load": z(e), "tau_sum": z(()),
                "tau_tokens": z(()), "accent_tokens": z(a), "accent_weight": z(a, e),
                "accent_active": z(a)}

    @torch.no_grad()
    def record(self, w: Tensor, tau: Tensor | None, valid: Tensor,
               token_accents: Tensor | None) -> None:
        if self._acc is None:
            self._acc = self._zeros(w.device)
        acc = self._acc
        m = valid.double()
        w = w.double()
        active = (w > 0).sum(-1)
        acc["tokens"] += m.sum()
        acc["active_hist"].index_add_(0, active, m)
        acc["load"] += (w * m.unsqueeze(-1)).sum(0)
        if tau is not None:
            tau_t = tau.double().expand(*w.shape[:-1], 1).reshape(-1)
            acc["tau_sum"] += (tau_t * m).sum()
            acc["tau_tokens"] += m.sum()
        if token_accents is not None:
            known = m * (token_accents >= 0)
            index = token_accents.clamp_min(0)
            acc["accent_tokens"].index_add_(0, index, known)
            acc["accent_weight"].index_add_(0, index, w * known.unsqueeze(-1))
            acc["accent_active"].index_add_(0, index, active.double() * known)

    def summary(self, current_tau: float | None) -> dict:
        e = self.num_experts
        acc = self._acc if self._acc is not None else self._zeros(torch.device("cpu"))
        tokens = float(acc["tokens"])
        hist = acc["active_hist"].tolist()
        sizes = torch.arange(e + 1, dtype=torch.float64, device=acc["active_hist"].device)
        tau_tokens = float(acc["tau_tokens"])
        return {
            "tokens": tokens,
            "active_mean": float((acc["active_hist"] * sizes).sum()) / tokens if tokens else None,
            "active_histogram": hist,  # index k = number of tokens with |S| = k
            "share_one_active": hist[1] / tokens if tokens else None,
            "share_all_active": hist[e] / tokens if tokens else None,
            "tau_current": current_tau,
            "tau_mean": float(acc["tau_sum"]) / tau_tokens if tau_tokens else None,
            "expert_load": [v / tokens for v in acc["load"].tolist()] if tokens else None,
            "accent_tokens": acc["accent_tokens"].tolist(),
            "accent_expert_weight": _share(acc["accent_weight"], acc["accent_tokens"]),
            "accent_active_mean": _share(acc["accent_active"], acc["accent_tokens"]),
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
        known = labels >= 0
        a = self.num_accents
        pairs = labels[known].long() * a + log_g[known].argmax(-1)
        counts = torch.bincount(pairs, minlength=a * a).view(a, a).double()
        self._confusion = counts if self._confusion is None else self._confusion + counts

    def summary(self) -> dict:
        if self._confusion is None:
            return {"utterances": 0, "accuracy": None, "confusion": None}
        total = float(self._confusion.sum())
        correct = float(self._confusion.diagonal().sum())
        return {"utterances": total, "accuracy": correct / total if total else None,
                "confusion": self._confusion.long().tolist()}
