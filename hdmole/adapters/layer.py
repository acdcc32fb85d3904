"""MoLoRALinear: a frozen nn.Linear plus a fused bank of LoRA experts.

    y = W0 x + b + (alpha / r) * sum_i w_i(x) * B_i A_i x

Fused computation (no Python loop over experts):
  1. the base product x W0^T + b and one product of x with the adapter rows [A_1; ...; A_E;
     R; t] in the compute dtype (autocast's or the input's): R = local router (E rows), t =
     per-token threshold (AdaMoLE); the frozen W0 is only read, never modified;
  2. routing (combination with the global posterior, selection) in fp32 on the small logits;
  3. the rank activations (E*r) are scaled slice-wise by w_i * alpha/r and multiplied by the
     concatenated B = [B_1 ... B_E] in one addmm onto the base output.
LoRA and the softmax-of-logits layers with a per-layer threshold (HDMoLE's default) run all
of it as one autograd node (fused.FusedLayer: fewer host ops, what large layers on a GPU are
bound by); the other strategies take the generic path (StackedLinear, route_and_gate, addmm),
the reference the fused layer is tested against. `lora` is the same layer with one expert of
rank E*r and no routing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig, ResolvedAdapter
from .context import RoutingState
from .fused import (LayerInputs, LayerSpec, cast, input_rows, layer_threshold, routing_dtype,
                    run_fused_layer, run_route_and_gate, use_compiled)
from .routing import Combination, build_combination
from .selection import Selection, build_selection


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's when active, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class StackedLinear(torch.autograd.Function):
    """(y, h) = (x W0^T + b, x D^T): the base product (cuBLAS's fused bias) and one product
    with the adapter rows D. Backward computes dx = [dy, dh] [W0; D] as ONE matrix product,
    instead of two products whose (N, d_in) results autograd would then add. (A stacked
    forward product would read x once but leave y strided, costing a copy and a separate
    bias pass: docs/method.md section 6b.) Runs in `dtype` (explicit casts; autocast is off
    inside). With `split` = k, h comes back as two outputs h[..., :k], h[..., k:] (no
    slice-backward zero tensors in autograd)."""

    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, b0: Tensor | None, down: Tensor,
                dtype: torch.dtype, split: int | None = None) -> tuple[Tensor, ...]:
        with torch.autocast(x.device.type, enabled=False):
            w0c, downc, xc = cast(w0, dtype), cast(down, dtype), cast(x, dtype)
            y = F.linear(xc, w0c, None if b0 is None else cast(b0, dtype))
            h = F.linear(xc, downc)
        ctx.save_for_backward(xc, w0c, downc)
        d_out = w0.shape[0]
        sizes = [d_out, down.shape[0]] if split is None else [d_out, split, down.shape[0] - split]
        ctx.shapes = (sizes, x.dtype, w0.dtype, down.dtype, b0 is not None)
        return (y, h) if split is None else (y, *h.split(sizes[1:], -1))

    @staticmethod
    def backward(ctx, dy: Tensor | None, *dhs: Tensor | None):
        xc, w0c, downc = ctx.saved_tensors
        sizes, x_dtype, w0_dtype, down_dtype, has_bias = ctx.shapes
        d_out = sizes[0]
        dtype = w0c.dtype
        lead = xc.shape[:-1]
        parts = [cast(g, dtype) if g is not None else xc.new_zeros(*lead, size, dtype=dtype)
                 for g, size in zip((dy, *dhs), sizes)]
        with torch.autocast(xc.device.type, enabled=False):
            grads = torch.cat(parts, -1).reshape(-1, sum(sizes))
            dx = ((grads @ torch.cat([w0c, downc])).view(*lead, -1) if ctx.needs_input_grad[0]
                  else None)
            flat_x = xc.reshape(-1, xc.shape[-1])
            d_down = grads[:, d_out:].t() @ flat_x
            dw0 = db0 = None
            if ctx.needs_input_grad[1]:
                dw0 = cast(grads[:, :d_out].t() @ flat_x, w0_dtype)
            if has_bias and ctx.needs_input_grad[2]:
                db0 = cast(grads[:, :d_out].sum(0), w0_dtype)
        return (cast(dx, x_dtype) if dx is not None else None, dw0, db0,
                cast(d_down, down_dtype), None, None)


class MoLoRALinear(nn.Module):
    """fused_layer=False: every call takes the generic path, fusable or not (the reference
    the fused layer is tested against and measured next to)."""

    def __init__(self, base: nn.Linear, name: str, cfg: AdapterConfig,
                 resolved: ResolvedAdapter, state: RoutingState | None,
                 fused_layer: bool = True) -> None:
        super().__init__()
        self.base = base
        self.adapter_name = name
        routed = cfg.method == "mole"
        self.num_experts = resolved.num_experts if routed else 1
        self.rank = cfg.rank if routed else cfg.rank * resolved.num_experts
        self.scaling = cfg.alpha / self.rank  # peft: alpha / this LoRA's (or expert's) rank
        self.check_finite = cfg.check_finite
        self.compile_mode = cfg.compile
        self.fused_layer = fused_layer
        d_in, d_out = base.in_features, base.out_features
        device = base.weight.device
        total_rank = self.num_experts * self.rank
        # Master weights in fp32 whatever the base dtype; cast to the input dtype per call.
        self.lora_A = nn.Parameter(torch.empty(total_rank, d_in, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, total_rank, device=device))
        for i in range(self.num_experts):  # each expert like a fresh nn.Linear (peft init)
            nn.init.kaiming_uniform_(self.lora_A[i * self.rank:(i + 1) * self.rank], a=math.sqrt(5))
        # Dropout on the rank activations, as a 0/1 mask with 1/keep folded into the scaling
        # (the same mask on the fused and the generic path).
        self.dropout = cfg.dropout
        self.state = state
        self.combination: Combination | None = None
        self.selection: Selection | None = None
        self.router: nn.Parameter | None = None
        self.needs_global = False
        if routed:
            assert state is not None
            self.combination = build_combination(cfg)
            self.selection = build_selection(cfg, resolved, d_in).to(device)
            self.combination.to(device)
            if self.combination.needs_local:
                self.router = nn.Parameter(
                    torch.randn(self.num_experts, d_in, device=device) * cfg.router_init_std)
            self.needs_global = cfg.global_router != "none"
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (for code that inspects `.weight` of linears)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def down_weight(self) -> Tensor:
        """[A; R; t]: all rows that read x, in one matrix."""
        rows = [self.lora_A]
        if self.router is not None:
            rows.append(self.router)
        read = input_rows(self.selection)
        if read is not None:
            rows.append(read.weight)
        return rows[0] if len(rows) == 1 else torch.cat(rows, 0)

    @property
    def fusable(self) -> bool:
        """Whether a call runs as one FusedLayer node: plain LoRA, or a softmax-of-logits
        combination with a per-layer threshold (HDMoLE's default, hdmole_no_hier, fixed
        thresholds). Everything else runs the generic path: StackedLinear + route_and_gate
        + addmm."""
        if not self.fused_layer:
            return False
        if self.selection is None:
            return True
        return (layer_threshold(self.selection) is not None
                and self.combination.softmax_of_logits)

    def compiles(self, x: Tensor) -> bool:
        """Whether a call on x runs its arithmetic through torch.compile now (use_compiled):
        the fused layer's, or the generic path's routing. Plain LoRA has no routing
        arithmetic: compiled only when forced (compile: true), and only as a fused layer."""
        if self.selection is None:
            return (self.fusable and self.compile_mode == "true"
                    and use_compiled(self.compile_mode, x))
        return use_compiled(self.compile_mode, x)

    def path(self, x: Tensor) -> str:
        """The path a call on x takes now, as tests and the bench report it: "fused layer"
        or "generic path", with " (compiled)" when its arithmetic is."""
        name = "fused layer" if self.fusable else "generic path"
        return f"{name} (compiled)" if self.compiles(x) else name

    def dropout_mask(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor | None, float]:
        """(0/1 mask over the rank activations or None, scaling with 1/keep folded in)."""
        if not (self.training and self.dropout > 0):
            return None, self.scaling
        keep = 1.0 - self.dropout
        mask = torch.empty(*x.shape[:-1], self.num_experts * self.rank, dtype=dtype,
                           device=x.device).bernoulli_(keep)
        return mask, self.scaling / keep

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        mask, scaling = self.dropout_mask(x, dtype)
        if self.fusable:
            return self.fused_forward(x, dtype, mask, scaling)
        total_rank = self.num_experts * self.rank
        y, a, rows = StackedLinear.apply(x, self.base.weight, self.base.bias, self.down_weight(),
                                         dtype, total_rank)
        if mask is not None:
            a = a * mask
        if self.selection is None:  # plain LoRA
            gated = a * scaling
        else:
            gated = self.route(a, rows, x, scaling)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), gated.reshape(-1, total_rank),
                          self.lora_B.to(gated.dtype).t())
        return out.view(y.shape)

    def fused_forward(self, x: Tensor, dtype: torch.dtype, mask: Tensor | None,
                      scaling: float) -> Tensor:
        compiled = self.compiles(x)
        if self.selection is None:
            spec = LayerSpec(dtype, scaling, self.rank, 0.0, compiled)
            inputs = LayerInputs(x, self.base.weight, self.base.bias, self.lora_A, None,
                                 self.lora_B, mask, None, None, None)
            return run_fused_layer(inputs, spec).y
        view = self.routing_view(x)
        tau_logit, tau_scale = layer_threshold(self.selection)
        spec = LayerSpec(dtype, scaling, self.rank, tau_scale, compiled)
        beta = getattr(self.combination, "beta", None) if view.log_g is not None else None
        inputs = LayerInputs(x, self.base.weight, self.base.bias, self.lora_A, self.router,
                             self.lora_B, mask, view.log_g, beta, tau_logit)
        out = run_fused_layer(inputs, spec)
        tau = None
        if self.state.statistics_enabled and self.state.inside:  # recorded per call
            tau = self.selection.threshold(None, routing_dtype(dtype)).detach()
        self.after_routing(view, out.p, out.w, tau, out.logits, out.total)
        return out.y

    def routing_view(self, x: Tensor):
        assert self.state is not None
        return self.state.batch_view(self.adapter_name, tuple(x.shape[:-1]), self.needs_global,
                                     x.device)

    def after_routing(self, view, p: Tensor, weights: Tensor, tau: Tensor | None,
                      logits: Tensor | None, watched: Tensor) -> None:
        """NaN watch, losses and statistics of one call (p, weights, logits (*tokens, E));
        `watched`: routing values that are NaN where the router logits are not finite."""
        if self.check_finite and self.router is not None:
            self.state.watch(f"adapter layer {self.adapter_name!r}", watched)
        self.state.record(self.adapter_name, p, weights, tau, logits, view)

    def route(self, a: Tensor, routing_rows: Tensor, x: Tensor, scaling: float) -> Tensor:
        """Generic path: rank activations a (*tokens, E*r) -> gated activations: fp32 routing
        on the local logits (+ threshold logits) and the global prior, then each expert's
        rank slice scaled by w_i * scaling. The arithmetic runs in `route_and_gate`, compiled
        or eager (fused.py); losses and statistics are recorded by after_routing."""
        assert self.selection is not None and self.combination is not None
        view = self.routing_view(x)
        routed = run_route_and_gate(self.combination, self.selection, a, routing_rows,
                                    view.log_g, scaling, self.num_experts, self.rank,
                                    self.compiles(x))
        self.after_routing(view, routed.p, routed.w, routed.tau, routed.logits, routed.p)
        return routed.gated

    def delta_weight(self, expert_weights: Tensor) -> Tensor:
        """(d_out, d_in) fp64 update sum_i w_i * (alpha/r) B_i A_i for fixed weights (E,)."""
        a = self.lora_A.detach().double().view(self.num_experts, self.rank, -1)
        b = self.lora_B.detach().double().view(-1, self.num_experts, self.rank)
        w = expert_weights.detach().double().to(a.device) * self.scaling
        return torch.einsum("oer,e,erd->od", b, w, a)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"rank={self.rank}, scaling={self.scaling:g}")
