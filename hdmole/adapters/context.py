"""RoutingState: what one `handle.routing(...)` block tells the adapted layers (the global
accent posterior, labels, token mask) and what the layers leave behind (loss terms,
statistics). One instance per AdapterHandle, shared by all its layers."""
from __future__ import annotations

import torch
from torch import Tensor

from typing import NamedTuple

from . import losses
from .statistics import LayerStatistics

# Unchecked CUDA NaN flags kept before `check_pending` waits for the oldest one: the
# stream is normally far past a flag that many blocks old, so the wait costs nothing.
MAX_PENDING_FLAGS = 4


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TokenView(NamedTuple):
    """What a layer input of shape (*token_shape, d) needs from the routing block; built once
    per block and token shape, shared by all layers (no per-layer recomputation)."""
    log_g: Tensor | None          # broadcastable to (*token_shape, E)
    valid: Tensor | None          # (N,) float in {0, 1}, or None: every token valid
    token_accents: Tensor | None  # (N,) accent label per token, -1 unknown
    stat_rows: Tensor             # (N,) int64 statistics row: accent, A unknown, A+1 padding
    stat_slot_base: Tensor        # stat_rows * (E + 1): histogram slot of |S| = 0
    ones: Tensor                  # (N,) float ones (valid when no mask applies)
    ones64: Tensor                # (N,) float64 ones (histogram counts)


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
        self.pending_flags: list[tuple[list[str], list[Tensor], Tensor, torch.cuda.Event]] = []
        self.clear()

    def clear(self) -> None:
        self.log_g: Tensor | None = None
        self.labels: Tensor | None = None
        self.token_mask: Tensor | None = None
        self.accent_ce: Tensor | None = None
        self.accent_accuracy: Tensor | None = None  # of the learned global router, on this block
        self.balance_terms: list[Tensor] = []
        self.z_terms: list[Tensor] = []
        self.watched: list[tuple[str, Tensor]] = []
        self.views: dict[tuple[tuple[int, ...], bool], TokenView] = {}

    def watch(self, where: str, values: Tensor) -> None:
        """Routing values that turn NaN when router logits are not finite (softmax of an
        inf or NaN logit). Inside a block they are kept and checked together when the block
        closes (one reduction for all layers, none per layer); outside a block now."""
        if self.inside:
            self.watched.append((where, values))
        else:
            self._raise_for([where], [values], bool(torch.isnan(values).any()), "")

    def close_block(self) -> None:
        """Check the block's watched values without stalling a CUDA stream: on CUDA one
        any-NaN flag over all of them is copied to pinned host memory asynchronously and
        checked by `check_pending` once the copy has completed (polled at each block's
        start), or on demand (`check_pending(wait=True)`); elsewhere it is checked now.
        Inside a CUDA-graph capture nothing can be read back (a replay only reruns
        kernels): the values are dropped."""
        if not self.watched or _capturing():
            self.watched = []
            return
        names = [where for where, _ in self.watched]
        values = [v.detach() for _, v in self.watched]
        self.watched = []
        device = values[0].device  # layers spread over devices: one flag on the first
        bad = torch.cat([v.reshape(-1).to(device) for v in values]).isnan().any()
        if bad.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending_flags.append((names, values, host, event))
        else:
            self._raise_for(names, values, bool(bad), "")

    def check_pending(self, wait: bool = True) -> None:
        """Raise for non-finite router logits of earlier blocks. wait=False (at a block's
        start) checks only flags whose copy has finished, plus the oldest ones beyond
        MAX_PENDING_FLAGS: no stream sync per block. Never during a CUDA-graph capture
        (no event may be queried then)."""
        if _capturing():
            return
        while self.pending_flags:
            names, values, host, event = self.pending_flags[0]
            if not (wait or len(self.pending_flags) > MAX_PENDING_FLAGS or event.query()):
                break
            self.pending_flags.pop(0)
            event.synchronize()
            self._raise_for(names, values, bool(host),
                            " (found after the routing block that produced it)")

    @staticmethod
    def _raise_for(names: list[str], values: list[Tensor], any_nan: bool, note: str) -> None:
        """Name every watched source with a NaN (read back only on this error path)."""
        if any_nan:
            bad = sorted({where for where, v in zip(names, values) if bool(v.isnan().any())})
            raise FloatingPointError(f"non-finite router logits in {', '.join(bad)}{note}")

    def add_layer(self, name: str) -> None:
        self.layer_statistics[name] = LayerStatistics(self.num_experts, self.num_accents)

    def batch_view(self, layer: str, token_shape: tuple[int, ...], needs_global: bool,
                   device: torch.device) -> TokenView:
        """For a layer input of shape (*token_shape, d): log g broadcastable to
        (*token_shape, E), flat per-token valid mask, accent labels and statistics rows.
        Cached per block and token shape."""
        if needs_global and (not self.inside or self.log_g is None):
            raise RuntimeError(f"adapter layer {layer!r} routes by accent: call the model "
                               "inside `with handle.routing(accent_features, ...)`")
        key = (tuple(token_shape), needs_global)
        view = self.views.get(key) if self.inside else None
        if view is None:
            view = self._make_view(layer, tuple(token_shape), device)
            if self.inside:
                self.views[key] = view
        return view

    def _make_view(self, layer: str, token_shape: tuple[int, ...],
                   device: torch.device) -> TokenView:
        log_g = token_accents = valid = None
        batch = self.log_g.shape[0] if self.log_g is not None else (
            self.labels.shape[0] if self.labels is not None else None)
        matches_batch = len(token_shape) >= 1 and token_shape[0] == batch
        if self.log_g is not None:
            if not matches_batch:
                raise ValueError(f"adapter layer {layer!r}: input tokens {token_shape} do not "
                                 f"start with the routing batch size {batch}")
            log_g = self.log_g.view(batch, *([1] * (len(token_shape) - 1)), -1)
        n = 1
        for size in token_shape:
            n *= size
        a = self.num_accents
        if self.token_mask is not None and tuple(self.token_mask.shape) == tuple(token_shape):
            valid = self.token_mask.reshape(-1).to(device, torch.float32)
        if self.labels is not None and matches_batch:
            token_accents = self.labels.view(batch, *([1] * (len(token_shape) - 1)))
            token_accents = token_accents.expand(token_shape).reshape(-1).to(device)
            rows = torch.where(token_accents >= 0, token_accents, a)
        else:
            rows = torch.full((n,), a, dtype=torch.long, device=device)
        if valid is not None:
            rows = torch.where(valid > 0, rows, a + 1)
        ones = torch.ones(n, device=device)
        return TokenView(log_g, valid, token_accents, rows, rows * (self.num_experts + 1), ones,
                         torch.ones(n, dtype=torch.float64, device=device))

    def record(self, layer: str, p: Tensor, w: Tensor, tau: Tensor | None,
               logits: Tensor | None, view: TokenView) -> None:
        """Called by every adapted layer on every forward, with (*tokens, E) tensors and tau
        a scalar or (*tokens, 1). Flattened here, only for what is enabled (training
        without statistics or losses costs nothing here)."""
        if not self.inside or not (self.want_balance or self.want_z or self.statistics_enabled):
            return  # outside a routing block: no losses, no statistics
        e = self.num_experts
        p, w = p.reshape(-1, e), w.reshape(-1, e)
        logits = logits.reshape(-1, e) if logits is not None else None
        if tau is not None and tau.dim() > 0:
            tau = tau.reshape(-1, 1)
        valid = view.valid if view.valid is not None else view.ones
        if self.want_balance:
            self.balance_terms.append(losses.load_balance(p, w, valid))
        if self.want_z and logits is not None:
            self.z_terms.append(losses.router_z_loss(logits, valid))
        if self.statistics_enabled:
            self.layer_statistics[layer].record(w, tau, view.stat_rows, view.stat_slot_base,
                                                valid, view.ones64)
