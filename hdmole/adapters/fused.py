"""The routing arithmetic of one MoLoRALinear call as one pure function, run eagerly or
through torch.compile (AdapterConfig.compile).

At the paper shape the routing tensors are small ((16384, 8) fp32) and the generic eager
path is launch-bound: some twenty tiny kernels forward and more backward, each with its
autograd record. Compiled (Inductor/Triton on CUDA) the function becomes a few fused kernels
each way. Eager, the common HDMoLE form (softmax-of-logits combination + threshold selection)
runs as one autograd Function with a hand-written backward (ThresholdGate). The arithmetic is
the same on every path; tests compare them in float64 (values and gradients).

compile = "auto": compiled on CUDA when gradients are enabled (training), eager otherwise
(CPU, inference, CUDA-graph capture); "true": compiled wherever possible; "false": eager.
A compile failure warns once and falls back to eager for the rest of the process.
"""
from __future__ import annotations

import contextlib
import types
import warnings
from typing import Callable

import torch
from torch import Tensor

from .routing import Combination
from .selection import Selection

# Backend of torch.compile; tests set "aot_eager" (traces and differentiates the graph like
# Inductor but needs no C++/Triton compiler).
COMPILE_BACKEND = "inductor"

# One compiled function per (combination, selection) pair, each with its own code
# object: Dynamo's recompile limit counts per code object, and a model (or the benchmark)
# may use several strategies; layers of different widths share one entry (dynamic strides).
_compiled: dict[tuple, Callable] = {}
_compile_error: str | None = None
# Which path the last call took: "compiled", "eager" or "eager (compile failed: ...)".
last_path: str = "none"


def route_and_gate(combination: Combination, selection: Selection, a: Tensor, rows: Tensor,
                   log_g: Tensor | None, scaling: float, num_experts: int, rank: int,
                   check_finite: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None,
                                                Tensor | None, Tensor | None]:
    """a (*tokens, E*r) rank activations; rows (*tokens, E [+ extra]) the routing rows of the
    fused product (local logits first, then the selection's extra rows); log_g broadcastable
    to (*tokens, E). Returns gated activations (a's dtype), p, w (*tokens, E), tau (scalar,
    (*tokens, 1) or None), fp32 local logits or None, and an all-finite flag of the logits
    (None unless check_finite)."""
    e = num_experts
    # fp32 routing for low-precision inputs; float64 inputs stay float64 (references).
    dtype = torch.promote_types(rows.dtype, torch.float32)
    logits = extra = finite = None
    if combination.needs_local:
        logits = rows[..., :e].to(dtype)
        if check_finite:
            finite = torch.isfinite(logits).all()
        rows = rows[..., e:]
    if selection.extra_rows:
        extra = rows.to(dtype) + selection.extra_bias().to(dtype)
    if log_g is not None:
        log_g = log_g.to(dtype)
    if (selection.thresholded and combination.softmax_of_logits
            and not torch.compiler.is_compiling()):  # compiled: Inductor fuses the generic path
        tau = selection.threshold(extra, dtype)
        gated, p, w = ThresholdGate.apply(a, logits, log_g, getattr(combination, "beta", None),
                                          tau, scaling, rank)
        return gated, p, w, tau, logits, finite
    p = combination(logits, log_g)
    if p.shape[:-1] != a.shape[:-1]:  # utterance-level p (global combination)
        p = p.expand(*a.shape[:-1], e)
    w, tau = selection(p, extra)
    gate = (w * scaling).to(a.dtype)
    gated = (a.unflatten(-1, (e, rank)) * gate.unsqueeze(-1)).flatten(-2)
    return gated, p, w, tau, logits, finite


def _eager_backward_compile():
    """Compile the backward together with the forward (AOTAutograd otherwise compiles it
    lazily at the first backward, where a compiler failure could not fall back to eager)."""
    config = torch._functorch.config
    if hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def _probe(compiled: Callable, args: tuple) -> None:
    """First call of a compiled function: run forward and backward on detached copies of the
    inputs (same shapes, strides and requires_grad, so the real call reuses the compiled
    graphs), so that any compile failure happens here, inside the fallback's reach."""
    def copy(t):
        return t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t

    probe_args = tuple(copy(t) for t in args)
    out = compiled(*probe_args)
    inputs = [t for t in probe_args if isinstance(t, Tensor) and t.requires_grad]
    if inputs and out[0].requires_grad:
        loss = out[0].float().sum() + out[2].float().sum()
        torch.autograd.grad(loss, inputs, allow_unused=True)


def _use_compiled(mode: str, a: Tensor) -> bool:
    if mode == "false" or _compile_error is not None:
        return False
    if a.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # never compile inside a CUDA-graph capture
    if mode == "true":
        return True
    return a.is_cuda and torch.is_grad_enabled()


def run_route_and_gate(combination: Combination, selection: Selection, a: Tensor, rows: Tensor,
                       log_g: Tensor | None, scaling: float, num_experts: int, rank: int,
                       check_finite: bool, mode: str = "auto"):
    """route_and_gate, compiled or eager according to `mode` (see the module docstring)."""
    global _compiled, _compile_error, last_path
    if _use_compiled(mode, a):
        # the flag is one fused reduction when compiled: always computed (one graph fewer)
        args = (combination, selection, a, rows, log_g, scaling, num_experts, rank, True)
        try:
            key = (type(combination).__name__, type(selection).__name__)
            first = key not in _compiled
            if first:
                code = route_and_gate.__code__.replace(co_name="route_and_gate_" + "_".join(
                    str(k) for k in key))
                function = types.FunctionType(code, route_and_gate.__globals__, code.co_name)
                _compiled[key] = torch.compile(function, backend=COMPILE_BACKEND, dynamic=None)
            with _eager_backward_compile():
                if first:
                    _probe(_compiled[key], args)
                out = _compiled[key](*args)
            last_path = "compiled"
            return out if check_finite else (*out[:5], None)
        except Exception as err:  # noqa: BLE001 - any compiler failure: eager is still exact
            _compile_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            warnings.warn(f"hdmole adapters: torch.compile of the routing failed "
                          f"({_compile_error}); falling back to eager for this process",
                          RuntimeWarning, stacklevel=2)
    out = route_and_gate(combination, selection, a, rows, log_g, scaling, num_experts, rank,
                         check_finite)
    last_path = "eager" if _compile_error is None else f"eager (compile failed: {_compile_error})"
    return out


def reset_compiled() -> None:
    """Forget the compiled function and any compile failure (tests, backend changes)."""
    global _compiled, _compile_error, last_path
    _compiled, _compile_error, last_path = {}, None, "none"


class ThresholdGate(torch.autograd.Function):
    """Eager fused kernel for softmax-of-logits combinations with threshold selections:

        z = l (+ beta * log g);  p = softmax(z);  w = (p - tau)_+ / sum_j (p_j - tau)_+
        gated = a * (w * scaling) per expert rank slice

    Same values as the generic path; the backward is written out (a dozen ops instead of the
    ~35 autograd records), in the routing dtype (fp32, or float64 for references). Returns
    (gated, p, w); p may receive a gradient (load-balance loss), w is used detached."""

    @staticmethod
    def forward(ctx, a: Tensor, logits: Tensor, log_g: Tensor | None, beta: Tensor | None,
                tau: Tensor, scaling: float, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        z = logits if log_g is None else logits + beta.to(logits.dtype) * log_g
        p = z.softmax(-1)
        excess = (p - tau).clamp_min(0.0)
        total = excess.sum(-1, keepdim=True)
        w = excess / total
        gate = (w * scaling).to(a.dtype)
        e = p.shape[-1]
        gated = (a.unflatten(-1, (e, rank)) * gate.unsqueeze(-1)).flatten(-2)
        ctx.save_for_backward(a, p, w, total, gate, log_g, beta, tau)
        ctx.scaling, ctx.rank = scaling, rank
        ctx.mark_non_differentiable(w)
        ctx.set_materialize_grads(False)  # unused outputs pass None, not zero tensors
        return gated, p, w

    @staticmethod
    def backward(ctx, d_gated: Tensor | None, d_p: Tensor | None, d_w: Tensor | None):
        a, p, w, total, gate, log_g, beta, tau = ctx.saved_tensors
        e, rank = p.shape[-1], ctx.rank
        need = ctx.needs_input_grad
        d_a = d_logits = d_log_g = d_beta = d_tau = None
        d_z_in = d_p
        if d_gated is not None:
            d_slices = d_gated.unflatten(-1, (e, rank))
            if need[0]:
                d_a = (d_slices * gate.unsqueeze(-1)).flatten(-2)
            # d gate_i = sum_r d_gated * a over expert i's rank slice, accumulated in p's dtype
            d_weight = (d_slices * a.unflatten(-1, (e, rank))).sum(-1, dtype=p.dtype) * ctx.scaling
            # w = excess / total: d excess = (d w - sum_j d w_j w_j) / total on active experts
            d_excess = (d_weight - (d_weight * w).sum(-1, keepdim=True)) / total
            d_excess = d_excess * (w > 0)
            d_z_in = d_excess if d_z_in is None else d_z_in + d_excess
            if need[4]:
                d_tau = -(d_excess.sum() if tau.dim() == 0 else
                          d_excess.sum(-1, keepdim=True).sum_to_size(tau.shape))
        if d_z_in is None:
            return d_a, None, None, None, d_tau, None, None
        # softmax backward: d z = p * (d p - sum_j d p_j p_j)
        d_z = p * (d_z_in - (d_z_in * p).sum(-1, keepdim=True))
        if need[1]:
            d_logits = d_z
        if log_g is not None:
            if need[2]:
                d_log_g = (beta.to(d_z.dtype) * d_z).sum_to_size(log_g.shape)
            if need[3]:
                d_beta = (d_z * log_g).sum().to(beta.dtype)
        return d_a, d_logits, d_log_g, d_beta, d_tau, None, None
