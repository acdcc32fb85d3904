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

    Raw sums only, on the routing tensors' device (no host sync): a histogram of |S| per
    statistics row (accents, "unknown", and a discard row for padding) and the routing
    weights per row, each filled by one index_add (float64: integer counts stay exact; not
    bincount, which syncs with the host on CUDA to size its output), and the threshold sum. Rows
    and counts are per routing block (RoutingState.TokenView), so a layer call costs a
    handful of kernels; everything else happens in `summary()`."""

    def __init__(self, num_experts: int, num_accents: int) -> None:
        self.num_experts = num_experts
        self.num_accents = num_accents
        self.reset()

    def reset(self) -> None:
        self._hist: Tensor | None = None    # ((A + 2) * (E + 1),) float64: tokens by row, |S|
        self._weight: Tensor | None = None  # (A + 2, E) float64: summed routing weights
        self._tau_sum: Tensor | None = None  # () float64 over valid tokens
        self._has_tau = False

    @torch.no_grad()
    def record(self, w: Tensor, tau: Tensor | None, rows: Tensor, slot_base: Tensor,
               valid: Tensor, ones: Tensor) -> None:
        """w (N, E); tau scalar or (N, 1); rows (N,) int64 statistics row of each token
        (accent, A = unknown, A + 1 = padding: discarded) and slot_base = rows * (E + 1);
        valid (N,) float in {0, 1}; ones (N,) float64."""
        e, a = self.num_experts, self.num_accents
        if self._hist is None or self._hist.device != w.device:
            # first call, or the model moved: start (or carry the counts) on w's device
            self._hist = (torch.zeros((a + 2) * (e + 1), dtype=torch.float64, device=w.device)
                          if self._hist is None else self._hist.to(w.device))
            self._weight = (torch.zeros(a + 2, e, dtype=torch.float64, device=w.device)
                            if self._weight is None else self._weight.to(w.device))
            self._tau_sum = torch.zeros((), dtype=torch.float64, device=w.device) if (
                self._tau_sum is None) else self._tau_sum.to(w.device)
        self._hist.index_add_(0, slot_base + (w > 0).sum(-1), ones)
        self._weight.index_add_(0, rows, w.double())
        if tau is not None:
            self._has_tau = True
            self._tau_sum += (tau.double().reshape(-1) * valid).sum() if tau.dim() > 0 else (
                tau.double() * valid.sum())

    def summary(self, current_tau: float | None) -> dict:
        e, a = self.num_experts, self.num_accents
        if self._hist is None:
            hist_rows = torch.zeros(a + 1, e + 1, dtype=torch.float64)
            weight_rows = torch.zeros(a + 1, e, dtype=torch.float64)
        else:  # drop the padding row
            hist_rows = self._hist.view(a + 2, e + 1)[:a + 1].double().cpu()
            weight_rows = self._weight[:a + 1].cpu()
        total_hist = hist_rows.sum(0)
        tokens = float(total_hist.sum())
        hist = total_hist.tolist()
        sizes = torch.arange(e + 1, dtype=torch.float64)
        per_accent = hist_rows[:a]
        accent_tokens = per_accent.sum(1)
        tau_sum = float(self._tau_sum) if self._tau_sum is not None else 0.0  # host sync here
        return {
            "tokens": tokens,
            "active_mean": float(total_hist @ sizes) / tokens if tokens else None,
            "active_histogram": hist,  # index k = number of tokens with |S| = k
            "share_one_active": hist[1] / tokens if tokens and e >= 1 else None,
            "share_all_active": hist[e] / tokens if tokens else None,
            "tau_current": current_tau,
            "tau_mean": tau_sum / tokens if tokens and self._has_tau else None,
            "expert_load": [v / tokens for v in weight_rows.sum(0).tolist()] if tokens else None,
            "accent_tokens": accent_tokens.tolist(),
            "accent_expert_weight": _share(weight_rows[:a], accent_tokens),
            "accent_active_mean": _share(per_accent @ sizes, accent_tokens),
            "accent_active_histogram": per_accent.tolist(),
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
        a = self.num_accents
        # one index_add over (true, guess) slots (bincount would sync on CUDA); unknown
        # labels (-1) go to a discarded slot
        slots = torch.where(labels >= 0, labels * a + log_g.argmax(-1), a * a)
        if self._confusion is None or self._confusion.device != log_g.device:
            self._confusion = (torch.zeros(a * a + 1, dtype=torch.float64, device=log_g.device)
                               if self._confusion is None else self._confusion.to(log_g.device))
        self._confusion.index_add_(0, slots, torch.ones(slots.shape, dtype=torch.float64,
                                                        device=slots.device))

    def summary(self) -> dict:
        if self._confusion is None:
            return {"utterances": 0, "accuracy": None, "confusion": None}
        a = self.num_accents
        confusion = self._confusion[:a * a].view(a, a).double().cpu()
        total = float(confusion.sum())
        correct = float(confusion.diagonal().sum())
        return {"utterances": total, "accuracy": correct / total if total else None,
                "confusion": confusion.long().tolist()}
