"""The arithmetic of one MoLoRALinear call, as pure functions run eagerly or through
torch.compile (AdapterConfig.compile), and the autograd nodes around them. A call takes one
of two paths (MoLoRALinear.path says which; docs/method.md section 6b):

- the fused layer (FusedLayer): the whole call (base product, adapter rows, threshold,
  routing, B product) as ONE autograd node with a hand-written backward, for plain LoRA and
  for softmax-of-logits combinations with a per-layer threshold (HDMoLE's default,
  `layer_threshold`). It exists for speed on large layers: at the paper shape a layer is
  bound by the host's cost per op, autograd record and kernel launch, and the node issues
  about 60 plain ops per forward+backward where autograd records ~150. Its arithmetic is
  layer_forward / layer_backward; the routing part is gate_forward / gate_backward.
- the generic path (StackedLinear in layer.py, route_and_gate here, addmm) under ordinary
  autograd: every combination and selection, the reference the fused layer is tested
  against (MoLoRALinear(fused_layer=False) runs fusable layers on it too). Its thresholded
  softmax-of-logits routing runs as ThresholdGate (the same gate_forward / gate_backward).

The arithmetic is the same on both paths; tests compare them in float64.

compile = "auto": routed layers compiled on CUDA when gradients are enabled (training), eager
otherwise (CPU, inference, CUDA-graph capture, inside `eager()`); "true": compiled wherever
possible (LoRA layers too); "false": eager. A compile failure warns once and falls back to
eager for the rest of the process.
"""
from __future__ import annotations

import contextlib
import itertools
import types
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import Combination
from .selection import (FixedThresholdSelection, LayerThresholdSelection, Selection,
                        ThresholdSelection, TokenThresholdSelection)

# Backend of torch.compile; tests set "aot_eager" (traces and differentiates the graph like
# Inductor but needs no C++/Triton compiler).
COMPILE_BACKEND = "inductor"

# Process-wide on purpose: the compiled copies of route_and_gate / layer_forward /
# layer_backward are a cache (_compiled_copy: compiling takes seconds, every layer of a
# variant reuses one copy); a compile failure says the compiler does not work in this process
# (every later call runs eager); `eager()` nests like torch.no_grad.
_compiled: dict[tuple, Callable] = {}
_compile_error: str | None = None
_eager_depth = 0  # > 0 inside `eager()`


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; skips the dispatch of a no-op .to() (this path is launch-bound)."""
    return t if t.dtype == dtype else t.to(dtype)


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision matrix products, float64 stays float64 (references)."""
    return torch.promote_types(dtype, torch.float32)


# ----- what the arithmetic needs from a selection beyond its interface -------------------
def layer_threshold(selection: Selection | None) -> tuple[Tensor | None, float] | None:
    """A per-layer threshold as FusedLayer computes it inside its node, tau = scale *
    sigmoid(logit): (logit, scale), or (None, tau) for a constant. None for every other
    strategy: they take the generic path."""
    if isinstance(selection, LayerThresholdSelection):
        return selection.theta, selection.tau_max
    if isinstance(selection, FixedThresholdSelection):
        return None, selection.tau_value
    return None


class InputRows(NamedTuple):
    """What a strategy reads from the layer's input: x weight^T + bias."""
    weight: Tensor  # (k, d_in)
    bias: Tensor    # (k,)


def input_rows(selection: Selection | None) -> InputRows | None:
    """What a strategy reads from the layer's input, or None. The rows join the layer's
    down-projection [A; R] (x is read once); their outputs plus the bias reach the
    selection as `extra`. Only AdaMoLE's per-token threshold has them."""
    if isinstance(selection, TokenThresholdSelection):
        return InputRows(selection.weight, selection.bias)
    return None


class Routed(NamedTuple):
    """The generic path's routing of one call (route_and_gate)."""
    gated: Tensor          # rank activations scaled per expert slice by w * scaling (a's dtype)
    p: Tensor              # (*tokens, E) routing probabilities, may receive a gradient
    w: Tensor              # (*tokens, E) expert weights
    tau: Tensor | None     # scalar or (*tokens, 1); None for strategies without a threshold
    logits: Tensor | None  # fp32 local router logits (z-loss); None without a local router


def route_and_gate(combination: Combination, selection: Selection, a: Tensor, rows: Tensor,
                   log_g: Tensor | None, scaling: float, num_experts: int,
                   rank: int) -> Routed:
    """a (*tokens, E*r) rank activations; rows (*tokens, E [+ k]) the routing rows of the
    down-projection (local logits first, then the selection's input_rows); log_g broadcastable
    to (*tokens, E)."""
    e = num_experts
    dtype = routing_dtype(rows.dtype)
    logits = extra = None
    if combination.needs_local:
        logits = rows[..., :e].to(dtype)
        rows = rows[..., e:]
    read = input_rows(selection)
    if read is not None:
        extra = rows.to(dtype) + read.bias.to(dtype)
    if log_g is not None:
        log_g = cast(log_g, dtype)
    if (isinstance(selection, ThresholdSelection) and combination.softmax_of_logits
            and not torch.compiler.is_compiling()):  # compiled: Inductor fuses the generic path
        tau = selection.threshold(extra, dtype)
        gate_inputs = GateInputs(a, logits, log_g, getattr(combination, "beta", None), tau)
        gated, p, w = run_threshold_gate(gate_inputs, scaling, rank)
        return Routed(gated, p, w, tau, logits)
    p = combination(logits, log_g)
    if p.shape[:-1] != a.shape[:-1]:  # utterance-level p (global combination)
        p = p.expand(*a.shape[:-1], e)
    w, tau = selection(p, extra)
    gate = (w * scaling).to(a.dtype)
    gated = (a.unflatten(-1, (e, rank)) * gate.unsqueeze(-1)).flatten(-2)
    return Routed(gated, p, w, tau, logits)


# ----- torch.compile, with an eager fallback ---------------------------------------------
def _eager_backward_compile():
    """Compile the backward together with the forward (AOTAutograd otherwise compiles it
    lazily at the first backward, where a compiler failure could not fall back to eager)."""
    config = torch._functorch.config
    if hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def _probe(compiled: Callable, args: tuple) -> None:
    """First call of a compiled route_and_gate: run forward and backward on detached copies
    of the inputs (same shapes, strides and requires_grad, so the real call reuses the
    compiled graphs), so that any compile failure happens here, inside the fallback's reach."""
    def copy(t):
        return t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t

    probe_args = tuple(copy(t) for t in args)
    out = compiled(*probe_args)
    inputs = [t for t in probe_args if isinstance(t, Tensor) and t.requires_grad]
    if inputs and out.gated.requires_grad:
        loss = out.gated.float().sum() + out.w.float().sum()
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
    global _compile_error
    lines = [line.strip() for line in f"{type(err).__name__}: {err}".splitlines() if line.strip()]
    _compile_error = " | ".join(lines[:4])[:600]
    warnings.warn(f"hdmole adapters: torch.compile of the adapter arithmetic failed "
                  f"({_compile_error}); falling back to eager for this process",
                  RuntimeWarning, stacklevel=3)


def run_route_and_gate(combination: Combination, selection: Selection, a: Tensor, rows: Tensor,
                       log_g: Tensor | None, scaling: float, num_experts: int, rank: int,
                       compiled: bool = False) -> Routed:
    """route_and_gate, through its compiled copy when `compiled` (use_compiled)."""
    return _run(route_and_gate, compiled, (type(combination).__name__, type(selection).__name__),
                combination, selection, a, rows, log_g, scaling, num_experts, rank, probe=True)


def reset_compiled() -> None:
    """Forget the compiled functions and any compile failure (tests, backend changes)."""
    global _compiled, _compile_error
    _compiled, _compile_error = {}, None


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


# ----- autograd nodes take their tensors as direct arguments of apply (autograd tracks only
# those): run_threshold_gate / run_fused_layer unpack the named tuples into apply, forward
# and backward rebuild them, and saved tensors go through these two -----------------------
def _save(ctx, *groups: tuple) -> None:
    """ctx.save_for_backward of named tuples of tensors (or None), flat."""
    ctx.save_for_backward(*itertools.chain(*groups))


def _saved(ctx, *kinds: type) -> list:
    """The named tuples _save saved, rebuilt field by field."""
    tensors = iter(ctx.saved_tensors)
    return [kind(*itertools.islice(tensors, len(kind._fields))) for kind in kinds]


# ----- the thresholded softmax gate ------------------------------------------------------
class GateInputs(NamedTuple):
    """The tensor inputs of gate_forward; the same fields hold their gradients
    (gate_backward) and whether each needs one."""
    a: Tensor              # (*tokens, E*r) rank activations
    logits: Tensor | None  # (*tokens, E) local router logits, routing dtype
    log_g: Tensor | None   # broadcastable to (*tokens, E): the global posterior, or None
    beta: Tensor | None    # weight of log g (None without it)
    tau: Tensor | float    # threshold: scalar or (*tokens, 1)


class Gate(NamedTuple):
    """gate_forward's results: its outputs, and what gate_backward needs."""
    gated: Tensor  # a * (w * scaling), per expert rank slice
    p: Tensor      # softmax(z)
    w: Tensor      # (p - tau)_+ / total
    total: Tensor  # (*tokens, 1) sum_j (p_j - tau)_+; NaN where the logits are not finite
    gate: Tensor   # w * scaling in a's dtype


def gate_forward(inputs: GateInputs, scaling: float, rank: int) -> Gate:
    """Softmax-of-logits combination + threshold selection, forward:

        z = l (+ beta * log g);  p = softmax(z);  w = (p - tau)_+ / sum_j (p_j - tau)_+
        gated = a * (w * scaling) per expert rank slice"""
    a, logits, log_g = inputs.a, inputs.logits, inputs.log_g
    z = logits if log_g is None else torch.addcmul(logits, log_g, cast(inputs.beta, logits.dtype))
    p = z.softmax(-1)
    excess = (p - inputs.tau).clamp_min_(0.0)
    total = excess.sum(-1, keepdim=True)
    w = excess.div_(total)
    gate = (w * scaling).to(a.dtype)
    e = p.shape[-1]
    gated = (a.unflatten(-1, (e, rank)) * gate.unsqueeze(-1)).flatten(-2)
    return Gate(gated, p, w, total, gate)


def gate_backward(d_gated: Tensor | None, d_p: Tensor | None, inputs: GateInputs, out: Gate,
                  scaling: float, rank: int, need: GateInputs) -> GateInputs:
    """Hand-written backward of gate_forward, in the routing dtype (fp32, or float64 for
    references): a dozen ops instead of ~35 autograd records. Reads inputs.a, .log_g, .beta,
    .tau and out.p, .w, .total, .gate; returns the gradients `need` asks for (else None)."""
    p, w = out.p, out.w
    e = p.shape[-1]
    d_a = d_log_g = d_beta = d_tau = None
    d_z_in = d_p
    if d_gated is not None:
        d_slices = d_gated.unflatten(-1, (e, rank))
        if need.a:
            d_a = (d_slices * out.gate.unsqueeze(-1)).flatten(-2)
        # d gate_i = sum_r d_gated * a over expert i's rank slice, accumulated in p's dtype
        d_weight = (d_slices * inputs.a.unflatten(-1, (e, rank))).sum(-1, dtype=p.dtype) * scaling
        # w = excess / total: d excess = (d w - sum_j d w_j w_j) / total on active experts
        d_excess = (d_weight - (d_weight * w).sum(-1, keepdim=True)) / out.total
        d_excess = d_excess * (w > 0)
        d_z_in = d_excess if d_z_in is None else d_z_in + d_excess
        if need.tau:
            tau = inputs.tau
            d_tau = -(d_excess.sum() if tau.dim() == 0 else
                      d_excess.sum(-1, keepdim=True).sum_to_size(tau.shape))
    if d_z_in is None:
        return GateInputs(d_a, None, None, None, d_tau)
    # softmax backward, d z = p * (d p - sum_j d p_j p_j), as autograd computes it
    d_z = torch._softmax_backward_data(d_z_in, p, -1, p.dtype)
    log_g, beta = inputs.log_g, inputs.beta
    if log_g is not None:
        if need.log_g:
            d_log_g = (cast(beta, d_z.dtype) * d_z).sum_to_size(log_g.shape)
        if need.beta:
            d_beta = cast((d_z * log_g).sum(), beta.dtype)
    return GateInputs(d_a, d_z if need.logits else None, d_log_g, d_beta, d_tau)


class ThresholdGate(torch.autograd.Function):
    """gate_forward / gate_backward as one autograd node: the eager routing of softmax-of-
    logits combinations with threshold selections on the generic path (run_threshold_gate).
    Returns (gated, p, w); p may receive a gradient (load-balance loss), w is used detached."""

    @staticmethod
    def forward(ctx, scaling: float, rank: int, *tensors: Tensor | None):
        inputs = GateInputs(*tensors)
        out = gate_forward(inputs, scaling, rank)
        # logits and gated are not read back
        _save(ctx, GateInputs(inputs.a, None, inputs.log_g, inputs.beta, inputs.tau),
              Gate(None, out.p, out.w, out.total, out.gate))
        ctx.scaling, ctx.rank = scaling, rank
        ctx.mark_non_differentiable(out.w)
        ctx.set_materialize_grads(False)  # unused outputs pass None, not zero tensors
        return out.gated, out.p, out.w

    @staticmethod
    def backward(ctx, d_gated: Tensor | None, d_p: Tensor | None, d_w: Tensor | None):
        inputs, out = _saved(ctx, GateInputs, Gate)
        need = GateInputs(*ctx.needs_input_grad[2:])
        grads = gate_backward(d_gated, d_p, inputs, out, ctx.scaling, ctx.rank, need)
        return None, None, *grads


def run_threshold_gate(inputs: GateInputs, scaling: float,
                       rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(gated, p, w) of ThresholdGate."""
    return ThresholdGate.apply(scaling, rank, *inputs)


# ----- the fused layer -------------------------------------------------------------------
class LayerSpec(NamedTuple):
    """The non-tensor arguments of FusedLayer."""
    dtype: torch.dtype    # of the matrix products (autocast's or the input's)
    scaling: float        # alpha/r, divided by the dropout keep probability when a mask is given
    rank: int             # per expert
    tau_scale: float      # tau = tau_scale * sigmoid(tau_logit); a constant tau without logit
    compiled: bool        # run the arithmetic through torch.compile (see use_compiled)


class LayerInputs(NamedTuple):
    """The tensor inputs of FusedLayer (None where a layer has none); the same fields hold
    their gradients, their dtypes, and whether each needs a gradient."""
    x: Tensor                  # (*tokens, d_in) the layer's input
    w0: Tensor                 # (d_out, d_in) frozen base weight
    b0: Tensor | None          # (d_out,) its bias
    lora_a: Tensor             # (E*r, d_in) experts' down-projections
    router: Tensor | None      # (E, d_in) local router; None for plain LoRA
    lora_b: Tensor             # (d_out, E*r) experts' up-projections
    mask: Tensor | None        # (*tokens, E*r) 0/1 dropout mask (1/keep is in the scaling)
    log_g: Tensor | None       # broadcastable to (*tokens, E): the global posterior, or None
    beta: Tensor | None        # its weight in the prior combination
    tau_logit: Tensor | None   # per-layer threshold logit; None: constant tau (tau_scale)


class LayerOutputs(NamedTuple):
    """FusedLayer's outputs (only y for plain LoRA); the same fields hold their gradients
    in the backward."""
    y: Tensor                    # (*tokens, d_out)
    p: Tensor | None = None      # (*tokens, E) fp32, may receive a gradient (load balance)
    w: Tensor | None = None      # (*tokens, E) expert weights, non-differentiable
    logits: Tensor | None = None  # fp32 local router logits, may receive a gradient (z-loss)
    # (*tokens, 1) threshold normaliser, non-differentiable; NaN where the router logits are
    # not finite (the layer's NaN watch)
    total: Tensor | None = None


class LayerSaved(NamedTuple):
    """What FusedLayer's backward reads, saved by its forward (the routing fields only for
    routed layers). Matrices are flat (N, ...) and in the compute dtype."""
    x: Tensor
    w0: Tensor
    down: Tensor                 # [A; R]
    lora_b: Tensor
    mask: Tensor | None
    gated: Tensor                # what multiplied B^T
    a: Tensor | None = None      # rank activations (after dropout)
    p: Tensor | None = None
    w: Tensor | None = None
    total: Tensor | None = None
    gate: Tensor | None = None   # w * scaling in the compute dtype
    log_g: Tensor | None = None
    beta: Tensor | None = None
    sig: Tensor | None = None    # sigmoid(tau_logit)


def layer_forward(inputs: LayerInputs,
                  spec: LayerSpec) -> tuple[LayerOutputs, LayerSaved]:
    """FusedLayer's forward arithmetic, a pure function (eager or compiled): its outputs
    and what the backward needs."""
    x, lora_a, router, dtype = inputs.x, inputs.lora_a, inputs.router, spec.dtype
    lead = x.shape[:-1]
    xc = cast(x, dtype).reshape(-1, x.shape[-1])
    w0c = cast(inputs.w0, dtype)
    # The base product keeps cuBLAS's fused bias; the adapter rows [A; R] are one skinny
    # product of their own (reading x twice costs what one stacked product costs, and the
    # stacked output would need a strided copy and a separate bias pass).
    y = F.linear(xc, w0c, None if inputs.b0 is None else cast(inputs.b0, dtype))
    down = cast(lora_a, dtype) if router is None else torch.cat([cast(lora_a, dtype),
                                                                 cast(router, dtype)])
    h = F.linear(xc, down)
    a = h if router is None else h[:, :lora_a.shape[0]]
    if inputs.mask is not None:
        a = a * inputs.mask.view(a.shape)
    bc = cast(inputs.lora_b, dtype)
    gate = logits = sig = None
    if router is None:
        gated = a * spec.scaling
    else:
        # fp32 routing for low-precision products; float64 stays float64 (references)
        logits = cast(h[:, lora_a.shape[0]:].view(*lead, -1), routing_dtype(dtype))
        if inputs.tau_logit is None:
            tau = spec.tau_scale
        else:
            sig = torch.sigmoid(cast(inputs.tau_logit, logits.dtype))
            tau = sig * spec.tau_scale
        gate = gate_forward(GateInputs(a.view(*lead, -1), logits, inputs.log_g, inputs.beta, tau),
                            spec.scaling, spec.rank)
        gated = gate.gated.view(a.shape)
    y.addmm_(gated, bc.t())  # in place: no copy of y
    if gate is None:
        return LayerOutputs(y.view(*lead, -1)), LayerSaved(xc, w0c, down, bc, inputs.mask, gated)
    return (LayerOutputs(y.view(*lead, -1), gate.p, gate.w, logits, gate.total),
            LayerSaved(xc, w0c, down, bc, inputs.mask, gated, a, gate.p, gate.w, gate.total,
                       gate.gate, inputs.log_g, inputs.beta, sig))


def layer_backward(d: LayerOutputs, saved: LayerSaved, spec: LayerSpec, dtypes: LayerInputs,
                   need: LayerInputs) -> LayerInputs:
    """FusedLayer's backward arithmetic, a pure function (eager or compiled): from the
    outputs' gradients `d`, the gradients `need` asks for (x flat), else None."""
    s, dtype, scaling = saved, spec.dtype, spec.scaling
    d_out = s.w0.shape[0]
    dyc = (cast(d.y, dtype).reshape(-1, d_out) if d.y is not None
           else s.x.new_zeros(s.x.shape[0], d_out))
    d_gated = dyc @ s.lora_b
    d_lora_b = cast(dyc.t() @ s.gated, dtypes.lora_b) if need.lora_b else None
    d_log_g = d_beta = d_tau_logit = None
    if s.p is None:
        parts = [d_gated * scaling]
    else:
        lead = s.p.shape[:-1]
        tau = 0.0 if s.sig is None else s.sig * spec.tau_scale
        gate_inputs = GateInputs(s.a.view(*lead, -1), None, s.log_g, s.beta, tau)
        grads = gate_backward(d_gated.view(*lead, -1), d.p, gate_inputs,
                              Gate(None, s.p, s.w, s.total, s.gate), scaling, spec.rank,
                              GateInputs(True, True, need.log_g, need.beta, need.tau_logit))
        d_log_g, d_beta = grads.log_g, grads.beta
        if grads.tau is not None:  # tau = tau_scale sigmoid(logit): d tau / d logit = tau (1 - sig)
            d_tau_logit = cast(grads.tau * tau * (1.0 - s.sig), dtypes.tau_logit)
        # + the z-loss's own use of the logits
        d_l = grads.logits if d.logits is None else grads.logits + d.logits
        parts = [grads.a.view(d_gated.shape), cast(d_l, dtype).view(d_gated.shape[0], -1)]
    if s.mask is not None:
        parts[0] = parts[0] * s.mask.view(parts[0].shape)
    dx = d_lora_a = d_router = None
    if need.x:  # dx = [dy, da, dl] [W0; A; R]: one product
        grads_out = torch.cat([dyc, *parts], -1)
        dx = cast(grads_out @ torch.cat([s.w0, s.down]), dtypes.x)
        d_rows = grads_out[:, d_out:]
    else:
        d_rows = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    if need.lora_a or need.router:
        d_down = d_rows.t() @ s.x
        if len(parts) == 1:
            d_lora_a = cast(d_down, dtypes.lora_a)
        else:
            d_a, d_r = d_down.split_with_sizes([s.a.shape[-1], s.p.shape[-1]])
            d_lora_a, d_router = cast(d_a, dtypes.lora_a), cast(d_r, dtypes.router)
    dw0 = cast(dyc.t() @ s.x, dtypes.w0) if need.w0 else None
    db0 = cast(dyc.sum(0), dtypes.b0) if need.b0 else None
    return LayerInputs(dx, dw0, db0, d_lora_a, d_router, d_lora_b, None, d_log_g, d_beta,
                       d_tau_logit)


class FusedLayer(torch.autograd.Function):
    """One whole MoLoRALinear call as ONE autograd node, for plain LoRA (router None) and
    for softmax-of-logits combinations with a per-layer threshold (HDMoLE's default):

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
    Called through run_fused_layer (LayerInputs -> LayerOutputs)."""

    @staticmethod
    def forward(ctx, spec: LayerSpec, *tensors: Tensor | None):
        inputs = LayerInputs(*tensors)
        ctx.key = tuple(t is None for t in inputs)
        x = inputs.x
        autocast_off = (torch.autocast(x.device.type, enabled=False)
                        if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext())
        with autocast_off:  # explicit dtypes inside
            outputs, saved = _run(layer_forward, spec.compiled, ("layer_forward", *ctx.key),
                                  inputs, spec)
        _save(ctx, saved)
        ctx.spec, ctx.x_shape = spec, x.shape
        ctx.dtypes = LayerInputs(*(None if t is None else t.dtype for t in inputs))
        ctx.mark_non_differentiable(*(t for t in (outputs.w, outputs.total) if t is not None))
        ctx.set_materialize_grads(False)  # unused outputs pass None, not zero tensors
        return tuple(outputs)

    @staticmethod
    def backward(ctx, dy: Tensor | None, d_p: Tensor | None, d_w: Tensor | None,
                 d_logits: Tensor | None, d_total: Tensor | None):
        d = LayerOutputs(dy, d_p, None, d_logits, None)  # w, total: non-differentiable
        key = ("layer_backward", *ctx.key, dy is None, d_p is None, d_logits is None)
        saved, = _saved(ctx, LayerSaved)
        need = LayerInputs(*ctx.needs_input_grad[1:])
        grads = _run(layer_backward, ctx.spec.compiled, key, d, saved, ctx.spec, ctx.dtypes, need)
        dx = None if grads.x is None else grads.x.view(ctx.x_shape)
        return None, dx, *grads[1:]  # None: spec; then the LayerInputs fields, x unflattened


def run_fused_layer(inputs: LayerInputs, spec: LayerSpec) -> LayerOutputs:
    """FusedLayer on named inputs."""
    return LayerOutputs(*FusedLayer.apply(spec, *inputs))
