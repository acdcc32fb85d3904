"""The arithmetic of one MoLoRALinear call, as pure functions run eagerly or through
torch.compile (AdapterConfig.compile), and the autograd nodes around them.

- FusedLayer: the whole call (base product, adapter rows, threshold, routing, B product) as
  ONE autograd node with a hand-written backward, for plain LoRA and for softmax-of-logits
  combinations with a per-layer threshold (HDMoLE's default). Its arithmetic is
  layer_forward / layer_backward; the routing part is gate_forward / gate_backward.
- The generic path's routing (route_and_gate: any combination and selection) under
  ordinary autograd; its thresholded softmax-of-logits form runs as ThresholdGate (the same
  gate_forward / gate_backward).

At the paper shape the routing tensors are small ((16384, 8) fp32) and a layer is bound by
the host's cost per op and kernel launch, which is what both the single node and the compiled
arithmetic (a few fused Triton kernels each way) save. docs/method.md section 6b has the
measurements. The arithmetic is the same on every path; tests compare them in float64.

compile = "auto": routed layers compiled on CUDA when gradients are enabled (training), eager
otherwise (CPU, inference, CUDA-graph capture, inside `eager()`); "true": compiled wherever
possible (LoRA layers too); "false": eager. A compile failure warns once and falls back to
eager for the rest of the process.
"""
from __future__ import annotations

import contextlib
import types
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import Combination
from .selection import Selection

# Backend of torch.compile; tests set "aot_eager" (traces and differentiates the graph like
# Inductor but needs no C++/Triton compiler).
COMPILE_BACKEND = "inductor"

# Compiled copies of route_and_gate / layer_forward / layer_backward (_compiled_copy).
_compiled: dict[tuple, Callable] = {}
_compile_error: str | None = None
_eager_depth = 0  # > 0 inside `eager()`
# Which path the last call took: "fused layer" (FusedLayer), or the routing of the generic
# path: "compiled", "eager" or "eager (compile failed: ...)".
last_path: str = "none"


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; skips the dispatch of a no-op .to() (this path is launch-bound)."""
    return t if t.dtype == dtype else t.to(dtype)


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision matrix products, float64 stays float64 (references)."""
    return torch.promote_types(dtype, torch.float32)


def route_and_gate(combination: Combination, selection: Selection, a: Tensor, rows: Tensor,
                   log_g: Tensor | None, scaling: float, num_experts: int,
                   rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """a (*tokens, E*r) rank activations; rows (*tokens, E [+ extra]) the routing rows of the
    fused product (local logits first, then the selection's extra rows); log_g broadcastable
    to (*tokens, E). Returns gated activations (a's dtype), p, w (*tokens, E), tau (scalar,
    (*tokens, 1) or None) and the fp32 local logits or None."""
    e = num_experts
    dtype = routing_dtype(rows.dtype)
    logits = extra = None
    if combination.needs_local:
        logits = rows[..., :e].to(dtype)
        rows = rows[..., e:]
    if selection.extra_rows:
        extra = rows.to(dtype) + selection.extra_bias().to(dtype)
    if log_g is not None:
        log_g = cast(log_g, dtype)
    if (selection.thresholded and combination.softmax_of_logits
            and not torch.compiler.is_compiling()):  # compiled: Inductor fuses the generic path
        tau = selection.threshold(extra, dtype)
        gated, p, w = ThresholdGate.apply(a, logits, log_g, getattr(combination, "beta", None),
                                          tau, scaling, rank)
        return gated, p, w, tau, logits
    p = combination(logits, log_g)
    if p.shape[:-1] != a.shape[:-1]:  # utterance-level p (global combination)
        p = p.expand(*a.shape[:-1], e)
    w, tau = selection(p, extra)
    gate = (w * scaling).to(a.dtype)
    gated = (a.unflatten(-1, (e, rank)) * gate.unsqueeze(-1)).flatten(-2)
    return gated, p, w, tau, logits


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


@contextlib.contextmanager
def eager():
    """Every adapter call inside runs eagerly, whatever AdapterConfig.compile says: for a
    CUDA-graph capture AND the warm-up before it (the warm-up must run the kernels the
    capture records: a kernel's first run inside a capture can fail it), or for debugging."""
    global _eager_depth
    _eager_depth += 1
    try:
        yield
    finally:
        _eager_depth -= 1


def use_compiled(mode: str, a: Tensor) -> bool:
    """Whether `compile` mode `mode` compiles a call on `a` now (module docstring)."""
    if mode == "false" or _compile_error is not None or _eager_depth:
        return False
    if a.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # never compile inside a CUDA-graph capture
    if mode == "true":
        return True
    return a.is_cuda and torch.is_grad_enabled()


def _compiled_copy(key: tuple, function: Callable) -> tuple[Callable, bool]:
    """(torch.compile'd copy of `function` for `key`, whether it was just made). Each copy
    has its own code object: Dynamo's recompile limit counts per code object, and a model
    (or the benchmark) uses several variants; layers of different widths share one copy
    (dynamic shapes after the first recompile)."""
    first = key not in _compiled
    if first:
        name = "_".join([function.__name__, *(str(k) for k in key)])
        code = function.__code__.replace(co_name=name)
        copy = types.FunctionType(code, function.__globals__, name, function.__defaults__)
        _compiled[key] = torch.compile(copy, backend=COMPILE_BACKEND, dynamic=None)
    return _compiled[key], first


def compile_error() -> str | None:
    """Why torch.compile failed in this process (then everything runs eager), or None."""
    return _compile_error


def _compile_failed(err: Exception) -> None:
    global _compile_error, last_path
    lines = [line.strip() for line in f"{type(err).__name__}: {err}".splitlines() if line.strip()]
    _compile_error = " | ".join(lines[:4])[:600]
    last_path = f"eager (compile failed: {_compile_error})"
    warnings.warn(f"hdmole adapters: torch.compile of the adapter arithmetic failed "
                  f"({_compile_error}); falling back to eager for this process",
                  RuntimeWarning, stacklevel=3)


def run_route_and_gate(combination: Combination, selection: Selection, a: Tensor, rows: Tensor,
                       log_g: Tensor | None, scaling: float, num_experts: int, rank: int,
                       mode: str = "auto"):
    """route_and_gate, compiled or eager according to `mode` (see the module docstring)."""
    global last_path
    compiled = use_compiled(mode, a)
    out = _run(route_and_gate, compiled, (type(combination).__name__, type(selection).__name__),
               combination, selection, a, rows, log_g, scaling, num_experts, rank, probe=True)
    if _compile_error is not None:
        last_path = f"eager (compile failed: {_compile_error})"
    else:
        last_path = "compiled" if compiled else "eager"
    return out


def reset_compiled() -> None:
    """Forget the compiled function and any compile failure (tests, backend changes)."""
    global _compiled, _compile_error, last_path
    _compiled, _compile_error, last_path = {}, None, "none"


def gate_forward(a: Tensor, logits: Tensor, log_g: Tensor | None, beta: Tensor | None,
                 tau: Tensor | float, scaling: float, rank: int):
    """Softmax-of-logits combination + threshold selection, forward:

        z = l (+ beta * log g);  p = softmax(z);  w = (p - tau)_+ / sum_j (p_j - tau)_+
        gated = a * (w * scaling) per expert rank slice

    Returns (gated, p, w, total, gate); the last two are what gate_backward needs."""
    z = logits if log_g is None else torch.addcmul(logits, log_g, cast(beta, logits.dtype))
    p = z.softmax(-1)
    excess = (p - tau).clamp_min_(0.0)
    total = excess.sum(-1, keepdim=True)
    w = excess.div_(total)
    gate = (w * scaling).to(a.dtype)
    e = p.shape[-1]
    gated = (a.unflatten(-1, (e, rank)) * gate.unsqueeze(-1)).flatten(-2)
    return gated, p, w, total, gate


def gate_backward(d_gated: Tensor | None, d_p: Tensor | None, a: Tensor, p: Tensor, w: Tensor,
                  total: Tensor, gate: Tensor, log_g: Tensor | None, beta: Tensor | None,
                  tau: Tensor | float, scaling: float, rank: int, need: tuple[bool, ...]):
    """Hand-written backward of gate_forward, in the routing dtype (fp32, or float64 for
    references): a dozen ops instead of ~35 autograd records. need = which of (a, logits,
    log_g, beta, tau) want a gradient. Returns their gradients (None where not needed)."""
    e = p.shape[-1]
    d_a = d_log_g = d_beta = d_tau = None
    d_z_in = d_p
    if d_gated is not None:
        d_slices = d_gated.unflatten(-1, (e, rank))
        if need[0]:
            d_a = (d_slices * gate.unsqueeze(-1)).flatten(-2)
        # d gate_i = sum_r d_gated * a over expert i's rank slice, accumulated in p's dtype
        d_weight = (d_slices * a.unflatten(-1, (e, rank))).sum(-1, dtype=p.dtype) * scaling
        # w = excess / total: d excess = (d w - sum_j d w_j w_j) / total on active experts
        d_excess = (d_weight - (d_weight * w).sum(-1, keepdim=True)) / total
        d_excess = d_excess * (w > 0)
        d_z_in = d_excess if d_z_in is None else d_z_in + d_excess
        if need[4]:
            d_tau = -(d_excess.sum() if tau.dim() == 0 else
                      d_excess.sum(-1, keepdim=True).sum_to_size(tau.shape))
    if d_z_in is None:
        return d_a, None, None, None, d_tau
    # softmax backward, d z = p * (d p - sum_j d p_j p_j), as autograd computes it
    d_z = torch._softmax_backward_data(d_z_in, p, -1, p.dtype)
    if log_g is not None:
        if need[2]:
            d_log_g = (cast(beta, d_z.dtype) * d_z).sum_to_size(log_g.shape)
        if need[3]:
            d_beta = cast((d_z * log_g).sum(), beta.dtype)
    return d_a, d_z if need[1] else None, d_log_g, d_beta, d_tau


class ThresholdGate(torch.autograd.Function):
    """gate_forward / gate_backward as one autograd node: the eager routing of softmax-of-
    logits combinations with threshold selections on the generic path (MoLoRALinear uses
    FusedLayer instead where it can). Returns (gated, p, w); p may receive a gradient
    (load-balance loss), w is used detached."""

    @staticmethod
    def forward(ctx, a: Tensor, logits: Tensor, log_g: Tensor | None, beta: Tensor | None,
                tau: Tensor, scaling: float, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        gated, p, w, total, gate = gate_forward(a, logits, log_g, beta, tau, scaling, rank)
        ctx.save_for_backward(a, p, w, total, gate, log_g, beta, tau)
        ctx.scaling, ctx.rank = scaling, rank
        ctx.mark_non_differentiable(w)
        ctx.set_materialize_grads(False)  # unused outputs pass None, not zero tensors
        return gated, p, w

    @staticmethod
    def backward(ctx, d_gated: Tensor | None, d_p: Tensor | None, d_w: Tensor | None):
        grads = gate_backward(d_gated, d_p, *ctx.saved_tensors, ctx.scaling, ctx.rank,
                              ctx.needs_input_grad[:5])
        return (*grads, None, None)


class LayerSpec(NamedTuple):
    """The non-tensor arguments of FusedLayer."""
    dtype: torch.dtype    # of the matrix products (autocast's or the input's)
    scaling: float        # alpha/r, divided by the dropout keep probability when a mask is given
    rank: int             # per expert
    tau_scale: float      # tau = tau_scale * sigmoid(tau_logit); a constant tau without logit
    compiled: bool        # run the arithmetic through torch.compile (see use_compiled)


def layer_forward(x: Tensor, w0: Tensor, b0: Tensor | None, lora_a: Tensor,
                  router: Tensor | None, lora_b: Tensor, mask: Tensor | None,
                  log_g: Tensor | None, beta: Tensor | None, tau_logit: Tensor | None,
                  dtype: torch.dtype, scaling: float, rank: int, tau_scale: float):
    """FusedLayer's forward arithmetic, a pure function (eager or compiled). Returns the
    outputs (y, p, w, logits, total) and what the backward needs."""
    lead = x.shape[:-1]
    xc = cast(x, dtype).reshape(-1, x.shape[-1])
    w0c = cast(w0, dtype)
    # The base product keeps cuBLAS's fused bias; the adapter rows [A; R] are one skinny
    # product of their own (reading x twice costs what one stacked product costs, and the
    # stacked output would need a strided copy and a separate bias pass).
    y = F.linear(xc, w0c, None if b0 is None else cast(b0, dtype))
    down = cast(lora_a, dtype) if router is None else torch.cat([cast(lora_a, dtype),
                                                                 cast(router, dtype)])
    h = F.linear(xc, down)
    a = h if router is None else h[:, :lora_a.shape[0]]
    if mask is not None:
        a = a * mask.view(a.shape)
    bc = cast(lora_b, dtype)
    p = w = total = gate = logits = sig = None
    if router is None:
        gated = a * scaling
    else:
        # fp32 routing for low-precision products; float64 stays float64 (references)
        logits = cast(h[:, lora_a.shape[0]:].view(*lead, -1), routing_dtype(dtype))
        if tau_logit is None:
            tau = tau_scale
        else:
            sig = torch.sigmoid(cast(tau_logit, logits.dtype))
            tau = sig * tau_scale
        gated, p, w, total, gate = gate_forward(a.view(*lead, -1), logits, log_g, beta, tau,
                                                scaling, rank)
        gated = gated.view(a.shape)
    y.addmm_(gated, bc.t())  # in place: no copy of y
    saved = (xc, w0c, down, a if router is not None else None, mask, gated, bc, p, w, total,
             gate, log_g, beta, sig)
    return (y.view(*lead, -1), p, w, logits, total), saved


def layer_backward(dy: Tensor | None, d_p: Tensor | None, d_logits: Tensor | None,
                   saved: tuple, dtypes: tuple, dtype: torch.dtype, scaling: float, rank: int,
                   tau_scale: float, need: tuple[bool, ...]) -> tuple:
    """FusedLayer's backward arithmetic, a pure function (eager or compiled): gradients of
    (x (flat), w0, b0, lora_a, router, lora_b, mask, log_g, beta, tau_logit), None where
    not needed."""
    xc, w0c, down, a, mask, gated, bc, p, w, total, gate, log_g, beta, sig = saved
    d_out = w0c.shape[0]
    dyc = (cast(dy, dtype).reshape(-1, d_out) if dy is not None
           else xc.new_zeros(xc.shape[0], d_out))
    d_gated = dyc @ bc
    d_lora_b = cast(dyc.t() @ gated, dtypes[5]) if need[5] else None
    d_log_g = d_beta = d_logit = None
    if p is None:
        parts = [d_gated * scaling]
    else:
        lead = p.shape[:-1]
        tau = 0.0 if sig is None else sig * tau_scale
        d_a, d_z, d_log_g, d_beta, d_tau = gate_backward(
            d_gated.view(*lead, -1), d_p, a.view(*lead, -1), p, w, total, gate, log_g, beta,
            tau, scaling, rank, (True, True, need[7], need[8], need[9]))
        if d_tau is not None:  # tau = tau_scale * sigmoid(logit): d tau / d logit = tau (1 - sig)
            d_logit = cast(d_tau * tau * (1.0 - sig), dtypes[6])
        d_l = d_z if d_logits is None else d_z + d_logits  # + the z-loss's own use
        parts = [d_a.view(d_gated.shape), cast(d_l, dtype).view(d_gated.shape[0], -1)]
    if mask is not None:
        parts[0] = parts[0] * mask.view(parts[0].shape)
    dx = d_lora_a = d_router = None
    if need[0]:  # dx = [dy, da, dl] [W0; A; R]: one product
        grads = torch.cat([dyc, *parts], -1)
        dx = cast(grads @ torch.cat([w0c, down]), dtypes[0])
        d_rows = grads[:, d_out:]
    else:
        d_rows = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    if need[3] or need[4]:
        d_down = d_rows.t() @ xc
        if len(parts) == 1:
            d_lora_a = cast(d_down, dtypes[3])
        else:
            d_lora_a, d_router = (cast(g, t) for g, t in
                                  zip(d_down.split_with_sizes([a.shape[-1], p.shape[-1]]),
                                      dtypes[3:5]))
    dw0 = cast(dyc.t() @ xc, dtypes[1]) if need[1] else None
    db0 = cast(dyc.sum(0), dtypes[2]) if need[2] else None
    return dx, dw0, db0, d_lora_a, d_router, d_lora_b, None, d_log_g, d_beta, d_logit


def _run(function: Callable, compiled: bool, key: tuple, *args, probe: bool = False):
    """function(*args), through its compiled copy when asked; a compile failure warns once
    and falls back to eager for the rest of the process. probe: the copy is differentiated
    by AOTAutograd (called under autograd, not inside FusedLayer), so its first call compiles
    the backward too, on copies of the inputs (_probe), where a failure can still fall back."""
    if compiled and _compile_error is None:
        try:
            copy, first = _compiled_copy(key, function)
            if not probe:
                return copy(*args)
            with _eager_backward_compile():
                if first:
                    _probe(copy, args)
                return copy(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: eager is still exact
            _compile_failed(err)
    return function(*args)


class FusedLayer(torch.autograd.Function):
    """One whole MoLoRALinear call as ONE autograd node, for plain LoRA (router None) and
    for softmax-of-logits combinations with threshold selection (HDMoLE's default):

        y = x W0^T + b;  [a, l] = x [A; R]^T       base product (cuBLAS bias), adapter rows
        a = a * dropout mask                        (0/1; 1/keep is folded into scaling)
        tau = tau_scale * sigmoid(tau_logit)        (or a constant)
        gated, p, w = gate_forward(a, l, log g, beta, tau)   fp32 routing (LoRA: a * scaling)
        y += gated B^T                              in place

    Backward is written out: dy B, one product [dy, da, dl] [W0; A; R] for dx (skipped when
    x needs no gradient), one for [dA; dR], one for dB. At the paper shape a layer is bound by
    the host's per-op cost (Python, dispatcher, autograd), which is what this saves: about
    60 plain ops per forward+backward instead of ~150 with an autograd record each, and with
    spec.compiled (CUDA training) a few fused kernels for the routing arithmetic.
    Values equal the generic path (StackedLinear + route_and_gate; tests in float64).

    Returns (y, p, w, logits, total): p (*tokens, E) fp32 may receive a gradient (load
    balance), logits (fp32 local router logits) too (z-loss); w and total (*tokens, 1), the
    threshold normaliser, NaN where the router logits are not finite, are non-
    differentiable; all four are None for LoRA."""

    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, b0: Tensor | None, lora_a: Tensor,
                router: Tensor | None, lora_b: Tensor, mask: Tensor | None,
                log_g: Tensor | None, beta: Tensor | None, tau_logit: Tensor | None,
                spec: LayerSpec):
        args = (x, w0, b0, lora_a, router, lora_b, mask, log_g, beta, tau_logit)
        ctx.key = tuple(t is None for t in args)
        autocast_off = (torch.autocast(x.device.type, enabled=False)
                        if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext())
        with autocast_off:  # explicit dtypes inside
            outputs, saved = _run(layer_forward, spec.compiled, ("layer_forward", *ctx.key),
                                  *args, spec.dtype, spec.scaling, spec.rank, spec.tau_scale)
        ctx.save_for_backward(*saved)
        ctx.spec, ctx.x_shape = spec, x.shape
        ctx.dtypes = tuple(None if t is None else t.dtype for t in args[:6]) + (
            None if tau_logit is None else tau_logit.dtype,)
        ctx.mark_non_differentiable(*(t for t in outputs[2::2] if t is not None))  # w, total
        ctx.set_materialize_grads(False)  # unused outputs pass None, not zero tensors
        return outputs

    @staticmethod
    def backward(ctx, dy: Tensor | None, d_p: Tensor | None, d_w: Tensor | None,
                 d_logits: Tensor | None, d_total: Tensor | None):
        spec = ctx.spec
        need = tuple(ctx.needs_input_grad[:10])
        grads = _run(layer_backward, spec.compiled,
                     ("layer_backward", *ctx.key, dy is None, d_p is None, d_logits is None),
                     dy, d_p, d_logits, ctx.saved_tensors, ctx.dtypes, spec.dtype,
                     spec.scaling, spec.rank, spec.tau_scale, need)
        dx = grads[0].view(ctx.x_shape) if grads[0] is not None else None
        return (dx, *grads[1:], None)


def run_fused_layer(*args) -> tuple:
    """FusedLayer.apply, recording the path taken."""
    global last_path
    last_path = "fused layer (compiled)" if args[-1].compiled and _compile_error is None \
        else "fused layer"
    return FusedLayer.apply(*args)
