"""hdmole.adapters: fused layer vs float64 per-expert reference, routing, gradients, losses,
statistics, errors. Small shapes: the whole file runs in a few seconds on CPU."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hdmole.adapters import AdapterConfig, inject
from hdmole.adapters.fused import input_rows
from hdmole.adapters.selection import SELECTION_REGISTRY

A = 4  # accents (= experts for hierarchical modes)
D_IN, D_HID, D_OUT, D_FEAT = 12, 10, 6, 8


class Projector(nn.Module):
    """Stand-in for the model's projector: two linears named like the real one."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(D_IN, D_HID)
        self.linear2 = nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.linear1(x)))


# (selection, global_router, combine): every strategy, every combination.
ROUTINGS = [(s, "learned", "prior") for s in SELECTION_REGISTRY] + [
    ("threshold", "learned", "sum"), ("threshold", "none", "local"),
    ("token_threshold", "none", "local"), ("topk", "oracle", "prior"),
    ("dense", "oracle", "global"), ("threshold", "learned", "global"),
]


def make(selection="threshold", global_router="learned", combine="prior", seed=0,
         randomise=True, fused_layer=True, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("dropout", 0.0)
    cfg = AdapterConfig(selection=selection, global_router=global_router, combine=combine,
                        **overrides)
    module = Projector()
    handle = inject(module, cfg, num_accents=A, accent_feature_dim=D_FEAT,
                    fused_layer=fused_layer)
    if randomise:  # B = 0 at init would hide every expert path
        with torch.no_grad():
            for p in handle.trainable_parameters().values():
                if p.dim() == 2:
                    p.normal_(0, 0.5)
    return module, handle


def batch(seed=1, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, D_IN, generator=g)
    feats = torch.randn(b, 7, D_FEAT, generator=g)
    fmask = torch.ones(b, 7, dtype=torch.bool)
    fmask[-1, 4:] = False
    labels = torch.arange(b) % A
    tmask = torch.ones(b, t, dtype=torch.bool)
    tmask[-1, 3:] = False
    return x, feats, fmask, labels, tmask


# ----- float64 per-expert, per-token reference (independent of the fused code) -------------
def ref_combine(cfg, layer, logits, log_g):
    soft = lambda v: (v - v.max()).exp() / (v - v.max()).exp().sum()  # noqa: E731
    if cfg.combine == "prior":
        return soft(logits + float(layer.combination.beta.detach()) * log_g)
    if cfg.combine == "sum":
        return cfg.gamma * log_g.exp() + (1 - cfg.gamma) * soft(logits)
    if cfg.combine == "local":
        return soft(logits)
    return log_g.exp()


def ref_select(cfg, layer, p, x_t):
    p = p.detach()
    e = len(p)
    order = sorted(range(e), key=lambda i: -float(p[i]))
    w = [0.0] * e
    if cfg.selection == "dense":
        return [float(v) for v in p]
    if cfg.selection == "topk":
        top = order[:cfg.top_k]
        total = sum(float(p[i]) for i in top)
        for i in top:
            w[i] = float(p[i]) / total
        return w
    if cfg.selection == "topp":
        mass = 0.0
        for i in order:
            if mass >= cfg.top_p:
                break
            w[i] = float(p[i])
            mass += float(p[i])
        return w
    tau_max = (1.0 - 1e-3) / e  # documented headroom below 1/E
    if cfg.selection == "fixed_threshold":
        tau = 1.0 / e / 2
    elif cfg.selection == "threshold":
        tau = tau_max / (1 + math.exp(-float(layer.selection.theta.detach())))
    else:
        z = float((x_t @ layer.selection.weight.double()[0] + layer.selection.bias.double()[0]).detach())
        tau = tau_max / (1 + math.exp(-z))
    active = [i for i in range(e) if float(p[i]) > tau]
    total = sum(float(p[i]) - tau for i in active)
    for i in active:
        w[i] = (float(p[i]) - tau) / total
    return w


def ref_layer(cfg, layer, x, log_g):
    """y_t = W0 x_t + b + sum_e w_e (alpha/r) B_e A_e x_t, one token and one expert at a time."""
    w0, b0 = layer.base.weight.double(), layer.base.bias.double()
    a, bm = layer.lora_A.double(), layer.lora_B.double()
    e, r = layer.num_experts, layer.rank
    out = torch.empty(*x.shape[:-1], w0.shape[0], dtype=torch.float64)
    for bi in range(x.shape[0]):
        for ti in range(x.shape[1]):
            x_t = x[bi, ti]
            logits = layer.router.double() @ x_t if layer.router is not None else None
            p = ref_combine(cfg, layer, logits, log_g[bi].double() if log_g is not None else None)
            w = ref_select(cfg, layer, p, x_t)
            y = w0 @ x_t + b0
            for i in range(e):
                y = y + w[i] * layer.scaling * (bm[:, i * r:(i + 1) * r] @ (a[i * r:(i + 1) * r] @ x_t))
            out[bi, ti] = y
    return out


@pytest.mark.parametrize("selection,global_router,combine", ROUTINGS)
def test_fused_matches_float64_reference(selection, global_router, combine):
    module, handle = make(selection, global_router, combine)
    module.double()
    x, feats, fmask, labels, _ = batch()
    x = x.double()
    with handle.routing(feats, fmask, labels):
        log_g = handle.state.log_g
        h1 = module.linear1(x)
        got = module.linear2(torch.relu(h1))
    assert torch.allclose(h1, ref_layer(handle.cfg, module.linear1, x, log_g), atol=1e-10, rtol=1e-10)
    want = ref_layer(handle.cfg, module.linear2, torch.relu(h1), log_g)
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)


def test_lora_matches_reference_and_has_matched_parameters():
    torch.manual_seed(0)
    mole_module, mole = make("threshold")
    lora_module, lora = make(method="lora")
    x = batch()[0].double()
    lora_module.double()
    layer = lora_module.linear1
    want = x @ layer.base.weight.double().T + layer.base.bias.double() + layer.scaling * (
        x @ layer.lora_A.double().T) @ layer.lora_B.double().T
    assert torch.allclose(layer(x), want, atol=1e-10)
    default = AdapterConfig()  # peft's convention: alpha / the LoRA's own rank
    assert layer.rank == A * default.rank and layer.scaling == default.alpha / (A * default.rank)
    experts = mole.trainable_report().by_group["experts"]
    assert lora.trainable_report().by_group["experts"] == experts


def test_uniform_dense_mixture_is_the_total_rank_lora():
    """The fairness premise of the scaling: gates summing to 1 at uniform routing make a dense
    mixture of E rank-r experts (scale alpha/r) the rank-E*r LoRA at scale alpha/(E*r)."""
    mole_module, _ = make("dense", global_router="none", combine="local")
    lora_module, _ = make(method="lora")
    mole_module.double()
    lora_module.double()
    x = batch()[0].double()
    for name in ("linear1", "linear2"):
        mixture, lora = getattr(mole_module, name), getattr(lora_module, name)
        with torch.no_grad():
            mixture.router.zero_()  # uniform p = 1/E
            for attr in ("lora_A", "lora_B"):
                getattr(lora, attr).copy_(getattr(mixture, attr))
            lora.base.load_state_dict(mixture.base.state_dict())
        inputs = x if name == "linear1" else torch.relu(mole_module.linear1(x))
        assert torch.allclose(mixture(inputs), lora(inputs), atol=1e-12), name


@pytest.mark.parametrize("selection,global_router,combine", ROUTINGS)
@pytest.mark.parametrize("fused_layer", [True, False])
def test_zero_init_is_the_base_layer(selection, global_router, combine, fused_layer):
    torch.manual_seed(0)
    reference = Projector()
    module = Projector()
    module.load_state_dict(reference.state_dict())
    cfg = AdapterConfig(selection=selection, global_router=global_router, combine=combine)
    handle = inject(module, cfg, num_accents=A, accent_feature_dim=D_FEAT,
                    fused_layer=fused_layer)
    x, feats, fmask, labels, tmask = batch()
    with handle.routing(feats, fmask, labels, tmask):
        assert torch.equal(module(x), reference(x))  # B = 0: exactly the base layer


# ----- selection properties --------------------------------------------------------------
def _selection(name: str, e: int, tau_logit: float = 0.0):
    cfg = AdapterConfig(selection=name, top_k=min(2, e), threshold_init=tau_logit)
    return SELECTION_REGISTRY[name](cfg, cfg.resolve(e), D_IN)


@settings(max_examples=60, deadline=None)
@given(e=st.integers(1, 9),
       logits=st.lists(st.floats(-60, 60, allow_nan=False), min_size=9, max_size=9),
       tau_logit=st.floats(-40, 40, allow_nan=False),
       name=st.sampled_from(sorted(SELECTION_REGISTRY)))
def test_at_least_one_expert_is_active(e, logits, tau_logit, name):
    sel = _selection(name, e, tau_logit)
    p = torch.tensor(logits[:e]).softmax(-1).unsqueeze(0)
    extra = torch.tensor([[tau_logit]]) if input_rows(sel) is not None else None
    w, _ = sel(p, extra)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (w > 0).sum() >= 1
    if name not in ("topp",):  # top-p keeps p itself (not renormalised)
        assert torch.allclose(w.sum(-1), torch.ones(1), atol=1e-5)


def test_uniform_routing_at_maximal_threshold_keeps_experts_active():
    sel = _selection("threshold", 4, tau_logit=80.0)  # sigmoid == 1.0 in fp32: tau = max
    w, tau = sel(torch.full((2, 4), 0.25), None)
    assert 0.2495 <= float(tau.detach()) < 0.25
    # the headroom below 1/E keeps the tied experts active instead of emptying the set
    assert torch.allclose(w, torch.full((2, 4), 0.25))


def test_number_of_active_experts_varies_with_threshold():
    torch.manual_seed(0)
    e = 8
    p = (torch.randn(500, e) * 1.5).softmax(-1)
    means = []
    for fraction in (0.0, 0.3, 0.6, 0.9, 0.999):
        cfg = AdapterConfig(selection="fixed_threshold", fixed_tau=fraction / e)
        w, _ = SELECTION_REGISTRY["fixed_threshold"](cfg, cfg.resolve(e), D_IN)(p, None)
        means.append((w > 0).sum(-1).float().mean().item())
    assert means[0] == e
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[-1] >= 1.0


# ----- gradients -------------------------------------------------------------------------
def _grads(handle, loss):
    params = handle.trainable_parameters()
    for p in params.values():
        p.grad = None
    loss.backward(retain_graph=True)
    return {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for n, p in params.items()}


@pytest.mark.parametrize("selection", ["threshold", "token_threshold"])
def test_gradients_reach_every_trainable_part_and_every_aux_loss_is_live(selection):
    glob = "learned" if selection == "threshold" else "none"
    module, handle = make(selection, glob, "prior" if glob == "learned" else "local",
                          lambda_balance=0.01, lambda_z=0.001)
    x, feats, fmask, labels, tmask = batch()
    with handle.routing(feats, fmask, labels, tmask):
        y = module(x)
    aux = handle.auxiliary_losses()
    expected = {"load_balance", "router_z"} | ({"accent_ce"} if glob == "learned" else set())
    assert set(aux) == expected
    main = _grads(handle, (y ** 2).mean())
    assert all(v > 0 for n, v in main.items() if "global_router" not in n or glob == "learned"), main
    for key in ("lora_A", "lora_B", "router"):
        assert main[f"linear1.{key}"] > 0 and main[f"linear2.{key}"] > 0
    threshold_keys = [n for n in main if ".selection." in n]
    assert threshold_keys and all(main[n] > 0 for n in threshold_keys)
    for name, loss in aux.items():
        g = _grads(handle, loss)
        routers = [v for n, v in g.items() if n.endswith(".router")]
        if name == "accent_ce":
            assert all(v > 0 for n, v in g.items() if "global_router" in n)
        else:
            assert routers and all(v > 0 for v in routers), (name, g)


def test_oracle_routing_changes_only_the_selected_experts():
    module, handle = make("dense", "oracle", "global")
    x, *_ = batch(b=2)
    labels = torch.tensor([1, 3])
    with handle.routing(accent_labels=labels):
        y = module(x)
    (y ** 2).mean().backward()
    for layer in handle.layers.values():
        r = layer.rank
        for i in range(A):
            ga = layer.lora_A.grad[i * r:(i + 1) * r].abs().sum()
            gb = layer.lora_B.grad[:, i * r:(i + 1) * r].abs().sum()
            if i in (1, 3):
                assert ga > 0 and gb > 0
            else:
                assert ga == 0 and gb == 0


# ----- padding, statistics, losses ---------------------------------------------------------
def test_padding_is_excluded_from_statistics_losses_and_pooling():
    module, handle = make("threshold", lambda_balance=0.01, lambda_z=0.01)
    x, feats, fmask, labels, tmask = batch()

    def run(x, feats):
        handle.statistics_reset()
        with handle.routing(feats, fmask, labels, tmask):
            module(x)
        return ({k: v.item() for k, v in handle.auxiliary_losses().items()},
                handle.statistics_summary())

    losses1, stats1 = run(x, feats)
    x2, feats2 = x.clone(), feats.clone()
    x2[~tmask] = 1e3  # garbage in padded tokens and frames must change nothing
    feats2[~fmask] = -1e3
    losses2, stats2 = run(x2, feats2)
    assert losses1 == pytest.approx(losses2, rel=1e-6)
    layer_stats = stats1["layers"]["linear1"]
    assert layer_stats["tokens"] == tmask.sum().item()
    assert sum(layer_stats["active_histogram"]) == tmask.sum().item()
    assert _close(stats1, stats2)


def _close(a, b) -> bool:
    """Recursive approximate equality of JSON-like values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


def test_statistics_accumulate_are_json_and_reset():
    module, handle = make("threshold")
    x, feats, fmask, labels, tmask = batch()
    for _ in range(2):
        with handle.routing(feats, fmask, labels, tmask):
            module(x)
    summary = json.loads(json.dumps(handle.statistics_summary()))
    s = summary["layers"]["linear2"]
    valid = tmask.sum().item()
    assert s["tokens"] == 2 * valid
    assert 1 <= s["active_mean"] <= A
    assert s["share_one_active"] == pytest.approx(s["active_histogram"][1] / (2 * valid))
    assert s["share_all_active"] == pytest.approx(s["active_histogram"][A] / (2 * valid))
    assert s["tau_current"] == pytest.approx(s["tau_mean"]) and 0 < s["tau_current"] < 1 / A
    assert sum(s["expert_load"]) == pytest.approx(1.0)
    for accent, row in enumerate(s["accent_expert_weight"]):
        if accent in labels.tolist():
            assert sum(row) == pytest.approx(1.0)
        else:
            assert row is None
    assert summary["global_router"]["utterances"] == 2 * len(labels)
    handle.statistics_reset()
    assert handle.statistics_summary()["layers"]["linear2"]["tokens"] == 0


def test_unknown_accent_labels_give_zero_accent_loss():
    module, handle = make("threshold")
    x, feats, fmask, _, tmask = batch()
    with handle.routing(feats, fmask, torch.full((3,), -1), tmask):
        module(x)
    loss = handle.auxiliary_losses()["accent_ce"]
    assert loss.item() == 0.0 and _grads(handle, loss)["adapter_handle.global_router.out.weight"] == 0
    with handle.routing(feats, fmask, None, tmask):
        module(x)
    assert "accent_ce" not in handle.auxiliary_losses()


def test_bf16_forward_is_finite_and_routes_in_fp32():
    module, handle = make("threshold")
    module.to(torch.bfloat16)
    handle.to(torch.bfloat16)
    x, feats, fmask, labels, tmask = batch()
    with handle.routing(feats.bfloat16(), fmask, labels, tmask):
        y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert handle.state.layer_statistics["linear1"].summary(None)["tokens"] == tmask.sum().item()


def test_eval_and_no_grad_forward():
    module, handle = make("token_threshold", "none", "local")
    module.eval()
    x = batch()[0]
    with torch.no_grad():
        y1 = module(x)  # local routing works outside a routing block too
        with handle.routing():
            y2 = module(x)
    assert torch.equal(y1, y2)


# ----- errors ----------------------------------------------------------------------------
def test_pattern_matching_nothing_lists_available_names():
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*linear1, linear2"):
        inject(Projector(), AdapterConfig(target_modules=["q_proj"]), A, D_FEAT)


def test_pattern_matches_whole_dotted_suffixes():
    outer = nn.Sequential(Projector())
    handle = inject(outer, AdapterConfig(target_modules=["linear2"]), A, D_FEAT)
    assert list(handle.layers) == ["0.linear2"]
    assert isinstance(outer[0].linear1, nn.Linear)


def test_expert_count_must_fit_accents_for_hierarchical_routing():
    with pytest.raises(ValueError, match="num_experts=3 does not fit 4 accents"):
        inject(Projector(), AdapterConfig(num_experts=3), A, D_FEAT)
    with pytest.raises(ValueError, match="num_experts=3 does not fit"):
        inject(Projector(), AdapterConfig(num_experts=3, global_router="oracle",
                                          combine="global", selection="dense"), A, D_FEAT)
    inject(Projector(), AdapterConfig(num_experts=3, global_router="none", combine="local"),
           A, D_FEAT)  # no hierarchy: any count


@pytest.mark.parametrize("selection", ["threshold", "topk"])  # fused layer, generic path
def test_nan_router_logits_name_the_layer(selection):
    module, handle = make(selection)
    with torch.no_grad():
        module.linear2.router[0, 0] = float("nan")
    x, feats, fmask, labels, tmask = batch()
    with pytest.raises(FloatingPointError, match=r"logits in adapter layer 'linear2'$"):
        with handle.routing(feats, fmask, labels, tmask):
            module(x)
    feats[0, 0, 0] = float("inf")  # the global router's input: its posterior, then all layers
    with pytest.raises(FloatingPointError, match="the global accent router"):
        with handle.routing(feats, fmask, labels, tmask):
            pass


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown adapter config key.*'rnak'"):
        AdapterConfig.from_dict({"rnak": 8})
    with pytest.raises(ValueError, match="adapter.selection='top2'"):
        AdapterConfig(selection="top2")
    with pytest.raises(ValueError, match="combine='local' ignores"):
        AdapterConfig(global_router="learned", combine="local").resolve(A)
    with pytest.raises(ValueError, match="tau_max"):
        AdapterConfig(tau_max=0.5).resolve(A)
    module, handle = make("threshold")
    with pytest.raises(RuntimeError, match="linear1.*routing"):
        module(batch()[0])


def test_freezing_and_trainable_report():
    none_module = Projector()
    inject(none_module, AdapterConfig(method="none"), A, D_FEAT)
    assert not any(p.requires_grad for p in none_module.parameters())
    full_module = Projector()
    full = inject(full_module, AdapterConfig(method="full", target_modules=["linear2"]), A, D_FEAT)
    report = full.trainable_report()
    assert report.trainable == D_HID * D_OUT + D_OUT == report.by_group["full"]
    _, handle = make("threshold")
    report = handle.trainable_report()
    assert report.trainable == sum(p.numel() for p in handle.trainable_parameters().values())
    assert report.by_group["experts"] == A * AdapterConfig().rank * (D_IN + D_HID + D_HID + D_OUT)
    assert "global_router" in report.table and "local_router" in report.table
    assert handle.effective_loss_weights() == {"accent_ce": 0.1, "load_balance": 0.01, "router_z": 0.0}
    _, local = make("threshold", "none", "local", lambda_accent=0.1)
    assert local.effective_loss_weights()["accent_ce"] == 0.0  # no learned global router


# ----- the stacked base+adapter product ----------------------------------------------------
def test_stacked_linear_gradcheck():
    from hdmole.adapters.layer import StackedLinear
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    down = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, w0, b0, down):
        y, h = StackedLinear.apply(x, w0, b0, down, torch.float64)
        return y * 1.5, h.sin()
    assert torch.autograd.gradcheck(f, (x, w0, b0, down))
    assert torch.autograd.gradcheck(lambda x, d: f(x, w0.detach(), None, d)[1], (x, down))


# (selection, global_router, combine, method): the layers FusedLayer runs.
FUSABLE = [("threshold", "learned", "prior", "mole"), ("threshold", "none", "local", "mole"),
           ("fixed_threshold", "learned", "prior", "mole"), ("threshold", "learned", "prior", "lora")]


@pytest.mark.parametrize("selection,global_router,combine,method", FUSABLE)
@pytest.mark.parametrize("train", [False, True])
def test_fused_layer_and_generic_path_agree_in_value_and_gradient(selection, global_router,
                                                                  combine, method, train):
    """FusedLayer (one autograd node, hand-written backward) against the generic path
    (StackedLinear + route_and_gate, autograd), float64, with every loss that reaches p and
    the logits, padding, and in training the same dropout mask (same seed)."""
    results = []
    for fused_layer in (True, False):
        module, handle = make(selection, global_router, combine, method=method,
                              fused_layer=fused_layer, dropout=0.3 if train else 0.0,
                              lambda_balance=0.01, lambda_z=0.01, lambda_accent=0.1)
        module.double().train(train)
        handle.double()
        for layer in handle.layers.values():
            assert layer.fusable == fused_layer
        x, feats, fmask, labels, tmask = batch()
        x = x.double().requires_grad_(True)
        torch.manual_seed(5)
        with handle.routing(feats.double(), fmask, labels, tmask):
            y = module(x)
        loss = (y ** 2).mean() + sum(handle.auxiliary_losses().values())
        loss.backward()
        results.append((y.detach(), x.grad, {n: p.grad for n, p in
                                             handle.trainable_parameters().items()}))
    (y1, gx1, g1), (y2, gx2, g2) = results
    assert torch.allclose(y1, y2, atol=1e-12) and torch.allclose(gx1, gx2, atol=1e-12)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert g1[n] is not None and torch.allclose(g1[n], g2[n], atol=1e-12), n


def test_threshold_contract_names_the_strategy_and_only_per_layer_thresholds_fuse():
    """threshold() on a strategy without one: a clear error, not a silent fallback; the
    fused layer computes tau itself (layer_threshold) only for per-layer thresholds."""
    from hdmole.adapters.fused import layer_threshold
    _, handle = make("topk")
    layer = handle.layers["linear1"]
    with pytest.raises(NotImplementedError, match="TopKSelection has no threshold"):
        layer.selection.threshold(None, torch.float32)
    assert layer_threshold(layer.selection) is None and not layer.fusable
    _, handle = make("token_threshold", "none", "local")  # per token: not a per-layer tau
    layer = handle.layers["linear1"]
    assert layer_threshold(layer.selection) is None and not layer.fusable
    for selection in ("threshold", "fixed_threshold"):
        _, handle = make(selection)
        layer = handle.layers["linear1"]
        logit, scale = layer_threshold(layer.selection)
        tau = scale if logit is None else scale * torch.sigmoid(logit)
        assert torch.equal(torch.as_tensor(tau).float(),
                           layer.selection.threshold(None, torch.float32)) and layer.fusable


def test_fused_layer_is_one_autograd_node_over_its_leaves():
    """The speed of a layer call on a GPU is bound by its host operations: the whole call
    (threshold included) must stay one node whose inputs are the trainable leaves, the
    layer's input and the global router's posterior."""
    module, handle = make("threshold", dropout=0.1)
    layer = module.linear1
    x, feats, fmask, labels, tmask = batch()
    x.requires_grad_(True)
    with handle.routing(feats, fmask, labels, tmask):
        y = layer(x)
    assert y.grad_fn.name() == "FusedLayerBackward"
    inputs = [fn for fn, _ in y.grad_fn.next_functions if fn is not None]
    leaves = {id(fn.variable) for fn in inputs if hasattr(fn, "variable")}
    assert leaves == {id(x), id(layer.lora_A), id(layer.router), id(layer.lora_B),
                      id(layer.combination.beta), id(layer.selection.theta)}
    others = [fn.name() for fn in inputs if not hasattr(fn, "variable")]
    assert len(others) == 1 and "View" in others[0]  # log g, from the global router


@pytest.mark.parametrize("routed,bias,masked,x_grad", [
    (True, True, True, True), (True, False, False, False), (False, True, True, True),
    (False, False, False, True)])
def test_fused_layer_backward_passes_gradcheck(routed, bias, masked, x_grad):
    """FusedLayer's hand-written backward against finite differences, every input that can
    have a gradient (x, W0, b0, A, R, B, log g, beta, threshold logit), p and logits used
    downstream."""
    from hdmole.adapters.fused import LayerInputs, LayerSpec, run_fused_layer
    g = torch.Generator().manual_seed(4)
    e, r, b, t, d_in, d_out = 3, 2, 2, 3, 5, 4
    f64 = torch.float64

    def leaf(*shape, grad=True):
        return torch.randn(shape, generator=g, dtype=f64).requires_grad_(grad)

    x, w0 = leaf(b, t, d_in, grad=x_grad), leaf(d_out, d_in)
    b0 = leaf(d_out) if bias else None
    lora_a, lora_b = leaf(e * r, d_in), leaf(d_out, e * r)
    router = leaf(e, d_in) if routed else None
    mask = ((torch.rand(b, t, e * r, generator=g) > 0.3).to(f64) if masked else None)
    log_g = leaf(b, 1, e) if routed else None
    beta = leaf() if routed else None
    tau_logit = torch.tensor(0.3, dtype=f64, requires_grad=True) if routed else None
    weights = torch.randn(b, t, e, generator=g, dtype=f64)  # a load-balance-like use of p
    spec = LayerSpec(f64, 1.5, r, 0.3, False)  # tau = 0.3 sigmoid(tau_logit)

    def f(x, w0, b0, lora_a, router, lora_b, log_g, beta, tau_logit):
        y, p, w, logits, total = run_fused_layer(
            LayerInputs(x, w0, b0, lora_a, router, lora_b, mask, log_g, beta, tau_logit), spec)
        if not routed:
            assert p is None and w is None and logits is None and total is None
            return y
        assert not (w.requires_grad or total.requires_grad or total.isnan().any())
        return y, (p * weights).sum() + logits.square().sum() * 0.1

    inputs = (x, w0, b0, lora_a, router, lora_b, log_g, beta, tau_logit)
    assert torch.autograd.gradcheck(f, inputs, atol=1e-7)


def test_autocast_bf16_matches_fp32_loosely_and_keeps_fp32_grads():
    module, handle = make("threshold")
    x, feats, fmask, labels, tmask = batch()
    with handle.routing(feats, fmask, labels, tmask):
        want = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), handle.routing(feats, fmask, labels, tmask):
        got = module(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    got.float().pow(2).mean().backward()
    for name, p in handle.trainable_parameters().items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


def test_mean_std_pooling_ignores_padded_frames():
    _, handle = make("threshold", global_pooling="mean_std")
    _, feats, fmask, labels, _ = batch()
    feats2 = feats.clone()
    feats2[~fmask] = 50.0
    outs = []
    for f in (feats, feats2):
        with handle.routing(f, fmask, labels):
            outs.append(handle.state.log_g)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def test_nan_outside_a_routing_block_raises_at_once():
    module, handle = make("threshold", "none", "local")
    with torch.no_grad():
        module.linear1.router[1, 2] = float("inf")
        module.linear1.router[1, 3] = -float("inf")
    with pytest.raises(FloatingPointError, match="linear1"):
        module(batch()[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_nan_check_is_deferred_to_the_next_block_and_names_the_layer():
    module, handle = make("threshold")
    module.cuda()
    handle.cuda()
    with torch.no_grad():
        module.linear2.router[0, 0] = float("nan")
    x, feats, fmask, labels, tmask = (t.cuda() for t in batch())
    with handle.routing(feats, fmask, labels, tmask):
        module(x)  # no stream sync here
    with pytest.raises(FloatingPointError, match="linear2"):
        handle.check_finite()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("selection,global_router,combine", ROUTINGS)
def test_cuda_bf16_autocast_matches_cpu_fp32(selection, global_router, combine):
    # eager routing: one Inductor compile per strategy would not fit the GPU check's time
    # limit; the compiled path has its own CUDA test below
    module, handle = make(selection, global_router, combine, compile="false")
    x, feats, fmask, labels, tmask = batch()
    with torch.no_grad(), handle.routing(feats, fmask, labels, tmask):
        want = module(x)
    module.cuda()
    handle.cuda()
    on_gpu = [t.cuda() for t in (x, feats, fmask, labels, tmask)]
    with torch.autocast("cuda", dtype=torch.bfloat16), handle.routing(*on_gpu[1:]):
        got = module(on_gpu[0])
    got.float().pow(2).mean().backward()
    handle.check_finite()
    assert got.dtype == torch.bfloat16
    scale = want.abs().max().item()
    # bf16 products; sparse selections may flip near-tied experts, hence a loose bound
    assert (got.float().cpu() - want).abs().mean().item() < 0.02 * scale
    for name, p in handle.trainable_parameters().items():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), name


def adapter_bench():
    """bench/adapter_layer.py as a module (bench/ is not a package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import adapter_layer
    return adapter_layer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile,fused_layer", [("false", True), ("auto", False)])
def test_cuda_graph_replay_of_forward_and_backward_matches_eager(compile, fused_layer):
    # bench/adapter_layer.py times the layer's GPU work as a graph replay: it must be the
    # same computation (eager routing inside the capture, finite flags dropped there).
    # compile=auto on the generic path: the step below runs compiled; the capture (and its
    # warm-up, fused.eager) eager, which the bench once failed to capture.
    module, handle = make("threshold", compile=compile, fused_layer=fused_layer)
    module.cuda()
    handle.cuda()
    x, feats, fmask, labels, tmask = (t.cuda() for t in batch())
    x.requires_grad_(True)
    params = list(handle.trainable_parameters().values())

    outputs = {}

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        with handle.routing(feats, fmask, labels, tmask):
            y = module(x)
        (y.float().pow(2).mean() + handle.auxiliary_losses()["accent_ce"]).backward()
        outputs["y"] = y.detach()  # not the graph: capture() needs them released

    step()
    want = outputs["y"].detach().clone()
    want_grads = [p.grad.clone() for p in params]
    replay = adapter_bench().capture(step)  # the bench's own capture: warm-up, then capture
    replay()
    torch.cuda.synchronize()
    assert torch.allclose(outputs["y"], want, atol=1e-5)
    for p, g in zip(params, want_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)
    handle.check_finite()  # the flags of the capture were dropped, the eager ones were fine


# ----- compiled routing (fused.py) ----------------------------------------------------------
@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile with the aot_eager backend: Dynamo + AOTAutograd trace and differentiate
    the routing graph as on CUDA, without needing a C++/Triton compiler in CI."""
    import torch._dynamo

    from hdmole.adapters import fused
    monkeypatch.setattr(fused, "COMPILE_BACKEND", "aot_eager")
    fused.reset_compiled()
    torch._dynamo.reset()
    yield fused
    fused.reset_compiled()
    torch._dynamo.reset()


def _run_float64(handle, module, x):
    x = x.double().requires_grad_()
    _, feats, fmask, labels, tmask = batch()
    with handle.routing(feats, fmask, labels, tmask):
        y = module(x)
    loss = y.square().sum() + sum(handle.auxiliary_losses().values())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in handle.trainable_parameters().items()
             if p.grad is not None}
    return y.detach(), x.grad, grads, handle.statistics_summary()


@pytest.mark.parametrize("selection,global_router,combine", ROUTINGS)
def test_compiled_routing_equals_eager_in_value_gradient_and_statistics(
        traced_compile, selection, global_router, combine):
    x = batch()[0]
    runs = []
    for mode in ("false", "true"):
        module, handle = make(selection, global_router, combine, compile=mode,
                              lambda_balance=0.01, lambda_z=0.0 if combine == "global" else 0.01)
        module.double()
        handle.double()
        runs.append(_run_float64(handle, module, x))
        layer = handle.layers["linear1"]
        assert layer.fusable == (selection in ("threshold", "fixed_threshold")
                                 and combine in ("prior", "local"))
        compiled = " (compiled)" if mode == "true" else ""
        path = "fused layer" if layer.fusable else "generic path"
        assert layer.path(x) == path + compiled
    (y0, gx0, g0, s0), (y1, gx1, g1, s1) = runs

    def same(u, v):  # float64 rounding only: relative to the tensor's scale
        return (u - v).abs().max() <= 1e-11 * max(v.abs().max().item(), 1.0)

    assert same(y0, y1) and same(gx0, gx1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        assert same(g0[k], g1[k]), k
    assert _close(s0, s1)


def test_compile_auto_is_eager_on_cpu_and_a_compile_failure_falls_back(traced_compile,
                                                                         monkeypatch):
    x = batch()[0]
    module, handle = make("dense", compile="auto")  # not fusable: generic routing
    with handle.routing(*batch()[1:]):
        want = module(x)
    assert module.linear1.path(x) == "generic path"

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(traced_compile, "COMPILE_BACKEND", broken_backend)
    for layer in handle.layers.values():
        layer.compile_mode = "true"
    assert module.linear1.path(x) == "generic path (compiled)"
    with pytest.warns(RuntimeWarning, match="falling back to eager"):
        with handle.routing(*batch()[1:]):
            got = module(x)
    assert "no compiler here" in traced_compile.compile_error()
    assert module.linear1.path(x) == "generic path"  # eager for the rest of the process
    assert torch.equal(got, want)


def test_eager_context_overrides_compile_and_nests(traced_compile):
    x = batch()[0]
    module, handle = make("threshold", compile="true")
    layer = module.linear1
    with handle.routing(*batch()[1:]):
        compiled = module(x)
        assert layer.path(x) == "fused layer (compiled)"
        with traced_compile.eager():
            with traced_compile.eager():
                module(x)
            assert layer.path(x) == "fused layer"
            eager = module(x)
        assert layer.path(x) == "fused layer (compiled)"
    assert torch.allclose(eager, compiled, atol=1e-5)


def test_compile_config_key_is_strict():
    assert AdapterConfig(compile=True).compile == "true"
    assert AdapterConfig(compile=False).compile == "false"
    with pytest.raises(ValueError, match="compile"):
        AdapterConfig(compile="sometimes")


@pytest.mark.parametrize("per_token_tau,prior", [(False, True), (True, False), (True, True)])
def test_threshold_gate_backward_passes_gradcheck(per_token_tau, prior):
    """The hand-written backward of the fused eager kernel against finite differences."""
    from hdmole.adapters.fused import GateInputs, run_threshold_gate
    g = torch.Generator().manual_seed(3)
    e, r, b, t = 4, 2, 2, 3

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    a, logits = leaf(b, t, e * r), leaf(b, t, e, scale=2.0)
    log_g = torch.randn(b, 1, e, generator=g, dtype=torch.float64).log_softmax(-1)
    log_g.requires_grad_()
    beta = leaf()
    tau = (torch.rand(b, t, 1, generator=g, dtype=torch.float64) * 0.2 if per_token_tau
           else torch.tensor(0.1, dtype=torch.float64)).requires_grad_()
    d_p = torch.randn(b, t, e, generator=g, dtype=torch.float64)  # a load-balance-like use of p

    def f(a, logits, log_g, beta, tau):
        inputs = GateInputs(a, logits, log_g if prior else None, beta if prior else None, tau)
        gated, p, _ = run_threshold_gate(inputs, 2.0, r)
        return gated, (p * d_p).sum()

    assert torch.autograd.gradcheck(f, (a, logits, log_g, beta, tau), atol=1e-8)


def test_pending_finite_flags_are_polled_without_waiting_and_checked_on_demand():
    """The CUDA path's bookkeeping, with a stand-in event: a block start (wait=False) checks
    only flags whose copy has finished, or the oldest beyond MAX_PENDING_FLAGS."""
    from hdmole.adapters.context import MAX_PENDING_FLAGS, RoutingState

    class Event:
        def __init__(self, done: bool) -> None:
            self.done, self.waited = done, False

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.waited = True

    state = RoutingState(num_experts=2, num_accents=2, want_balance=False, want_z=False)
    busy = Event(done=False)
    nan, fine = torch.tensor([[0.5], [float("nan")]]), torch.ones(2, 1)
    state.pending_flags.append((["layer 'w'", "layer 'x'"], [fine, nan], torch.tensor(True),
                                busy))
    state.check_pending(wait=False)  # copy not finished: no wait, no error yet
    assert not busy.waited and len(state.pending_flags) == 1
    for _ in range(MAX_PENDING_FLAGS):
        state.pending_flags.append((["layer 'y'"], [fine], torch.tensor(False),
                                    Event(done=False)))
    with pytest.raises(FloatingPointError, match="in layer 'x' \\(found after"):
        state.check_pending(wait=False)  # too many pending: the oldest is waited for
    assert busy.waited
    state.check_pending(wait=True)
    assert state.pending_flags == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("selection,modes,paths", [
    ("dense", ("false", "auto"), ("generic path", "generic path (compiled)")),
    ("threshold", ("false", "auto"), ("fused layer", "fused layer (compiled)"))])
def test_cuda_compiled_routing_matches_eager(selection, modes, paths):
    """The default CUDA training paths (compile=auto: Inductor/Triton) against eager, fp32:
    the generic path's routing (dense) and the fused layer (HDMoLE's default)."""
    x, feats, fmask, labels, tmask = (t.cuda() for t in batch())
    runs = []
    for mode in modes:
        module, handle = make(selection, compile=mode, lambda_balance=0.01)
        module.cuda()
        handle.cuda()
        with handle.routing(feats, fmask, labels, tmask):
            y = module(x)
        (y.square().sum() + sum(handle.auxiliary_losses().values())).backward()
        runs.append((y.detach(), {k: p.grad for k, p in handle.trainable_parameters().items()},
                     module.linear1.path(x)))
    (y0, g0, path0), (y1, g1, path1) = runs
    assert (path0, path1) == paths

    def same(u, v):  # fp32 rounding of differently fused kernels, relative to the scale
        return (u - v).abs().max().item() <= 1e-4 * max(v.abs().max().item(), 1.0)

    assert same(y0, y1)
    for k in g0:
        assert same(g0[k], g1[k]), k
