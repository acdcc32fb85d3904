"""RoutingState: what one `handle.routing(...)` block tells the adapted layers (the global
accent posterior, labels, token mask) and what the layers leave behind (loss terms,
statistics). One instance per AdapterHandle, shared by all its layers."""
from __future__ import annotations

import torch
from torch import Tensor

from . import losses
from .statistics import LayerStatistics


class RoutingState:
    def __init__(self, num_experts: int, num_accents: int, want_balance: bool,
                 want_z: bool) -> None:
        self.num_experts = num_experts
        self.num_accents = num_accents
        self.want_balance = want_balance
        self.want_z = want_z
        self.statistics_enabled = True
        self.layer_statistics: dict[str, LayerStatistics] = {}
        self.inside = False
        self.pending_flags: tuple[list[str], Tensor, torch.cuda.Event] | None = None
        self.clear()

    def clear(self) -> None:
        self.log_g: Tensor | None = None
        self.labels: Tensor | None = None
        self.token_mask: Tensor | None = None
        self.accent_ce: Tensor | None = None
        self.balance_terms: list[Tensor] = []
        self.z_terms: list[Tensor] = []
        self.finite_flags: list[tuple[str, Tensor]] = []

    def watch_finite(self, where: str, values: Tensor) -> None:
        """Inside a block: keep a device-side flag, checked when the block closes. Outside a
        block: check now."""
        flag = torch.isfinite(values).all()
        if self.inside:
            self.finite_flags.append((where, flag))
        elif not bool(flag):
            raise FloatingPointError(f"non-finite router logits in {where}")

    def close_block(self) -> None:
        """Check the block's flags without stalling a CUDA stream: on CUDA the flags are
        copied to pinned host memory asynchronously and checked by `check_pending` (at the
        next block's start, or on demand); elsewhere they are checked now."""
        if not self.finite_flags:
            return
        names = [where for where, _ in self.finite_flags]
        flags = torch.stack([flag for _, flag in self.finite_flags])
        self.finite_flags = []
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending_flags = (names, host, event)
        else:
            self._raise_for(names, flags.tolist(), "")

    def check_pending(self) -> None:
        if self.pending_flags is None:
            return
        names, host, event = self.pending_flags
        self.pending_flags = None
        event.synchronize()
        self._raise_for(names, host.tolist(), " (found after the routing block that produced it)")

    @staticmethod
    def _raise_for(names: list[str], ok: list[bool], note: str) -> None:
        bad = sorted({where for where, good in zip(names, ok) if not good})
        if bad:
            raise FloatingPointError(f"non-finite router logits in {', '.join(bad)}{note}")

    def add_layer(self, name: str) -> None:
        self.layer_statistics[name] = LayerStatistics(self.num_experts, self.num_accents)

    def batch_view(self, layer: str, token_shape: tuple[int, ...], needs_global: bool
                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """For a layer input of shape (*token_shape, d): log g broadcastable to
        (*token_shape, E), and flat per-token valid mask and accent labels (or None)."""
        if needs_global and (not self.inside or self.log_g is None):
            raise RuntimeError(f"adapter layer {layer!r} routes by accent: call the model "
                               "inside `with handle.routing(accent_features, ...)`")
        log_g = token_accents = valid = None
        batch = self.log_g.shape[0] if self.log_g is not None else (
            self.labels.shape[0] if self.labels is not None else None)
        matches_batch = len(token_shape) >= 1 and token_shape[0] == batch
        if self.log_g is not None:
            if not matches_batch:
                raise ValueError(f"adapter layer {layer!r}: input tokens {token_shape} do not "
                                 f"start with the routing batch size {batch}")
            log_g = self.log_g.view(batch, *([1] * (len(token_shape) - 1)), -1)
        if self.token_mask is not None and tuple(self.token_mask.shape) == tuple(token_shape):
            valid = self.token_mask.reshape(-1).float()
        if self.labels is not None and matches_batch:
            token_accents = self.labels.view(batch, *([1] * (len(token_shape) - 1)))
            token_accents = token_accents.expand(token_shape).reshape(-1)
        return log_g, valid, token_accents

    def record(self, layer: str, p: Tensor, w: Tensor, tau: Tensor | None,
               logits: Tensor | None, valid: Tensor | None,
               token_accents: Tensor | None) -> None:
        """Called by every adapted layer on every forward, with flat (N, E) tensors."""
        if not self.inside:
            return  # outside a routing block: no losses, no statistics
        if valid is None:
            valid = p.new_ones(p.shape[0])
        if self.want_balance:
            self.balance_terms.append(losses.load_balance(p, w, valid))
        if self.want_z and logits is not None:
            self.z_terms.append(losses.router_z_loss(logits, valid))
        if self.statistics_enabled:
            if tau is not None and tau.dim() > 0:
                tau = tau.reshape(-1, 1)
            self.layer_statistics[layer].record(w, tau, valid, token_accents)
