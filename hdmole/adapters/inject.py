"""inject(): wrap the matching nn.Linear layers of any module and return an AdapterHandle,
the one object the model talks to (routing context, auxiliary losses, statistics, report)."""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from .config import AdapterConfig, ResolvedAdapter
from .context import RoutingState
from .fused import layer_threshold
from .layer import MoLoRALinear
from .losses import accent_cross_entropy
from .routing import GlobalAccentRouter, build_global_router
from .statistics import GlobalRouterStatistics

HANDLE_PREFIX = "adapter_handle."


def find_targets(module: nn.Module, patterns: list[str]) -> dict[str, nn.Linear]:
    """nn.Linear submodules whose qualified name (or a whole dotted suffix of it) matches
    one of the patterns. Raises with the available names when nothing matches."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(rf"(?:.*\.)?(?:{pattern})"))
        except re.error as err:
            raise ValueError(f"adapter.target_modules pattern {pattern!r} is not a valid "
                             f"regular expression: {err}") from None
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) and name}
    targets = {name: m for name, m in linears.items()
               if any(c.fullmatch(name) for c in compiled)}
    if not targets:
        available = ", ".join(linears) if linears else "(none)"
        raise ValueError(f"adapter.target_modules={list(patterns)} matched no nn.Linear under "
                         f"{type(module).__name__}; available Linear names: {available}")
    return targets


@dataclass
class TrainableReport:
    """Parameter counts of a model after inject(); `table` is a readable summary."""
    total: int
    trainable: int
    by_group: dict[str, int]
    target_linear_parameters: int  # what `full` would train on the same modules

    @property
    def share_of_full(self) -> float:
        adapter = sum(self.by_group.values())
        return adapter / self.target_linear_parameters if self.target_linear_parameters else 0.0

    @property
    def table(self) -> str:
        lines = [f"{'group':<16}{'parameters':>14}"]
        lines += [f"{group:<16}{count:>14,}" for group, count in self.by_group.items()]
        lines.append(f"{'adapter total':<16}{sum(self.by_group.values()):>14,}")
        lines.append(f"trainable {self.trainable:,} of {self.total:,} "
                     f"({100.0 * self.trainable / max(self.total, 1):.3f}%)")
        lines.append(f"adapter / full fine-tuning of the targeted linears "
                     f"({self.target_linear_parameters:,}): {100.0 * self.share_of_full:.2f}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table


def _group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("lora_A", "lora_B"):
        return "experts"
    if leaf == "router":
        return "local_router"
    if ".selection." in name:
        return "threshold"
    if ".combination." in name:
        return "combination"
    return "global_router"


class AdapterHandle(nn.Module):
    """Owns the global accent router (so the model saves and optimises it) and references,
    without registering, the wrapped layers (they live in the injected module's tree)."""

    def __init__(self, cfg: AdapterConfig, resolved: ResolvedAdapter, root: nn.Module,
                 layers: dict[str, MoLoRALinear], full_targets: dict[str, nn.Linear],
                 global_router: nn.Module | None, state: RoutingState | None,
                 accent_feature_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.resolved = resolved
        self.accent_feature_dim = accent_feature_dim
        object.__setattr__(self, "_root", root)  # not a submodule: the root may contain us
        self._layers = layers
        self._full_targets = full_targets
        self.global_router = global_router
        self.state = state
        self.global_statistics = GlobalRouterStatistics(resolved.num_accents)

    @property
    def layers(self) -> dict[str, MoLoRALinear]:
        return dict(self._layers)

    @property
    def root(self) -> nn.Module:
        return self._root  # type: ignore[attr-defined]

    # ----- routing ------------------------------------------------------------------------
    @contextmanager
    def routing(self, accent_features: Tensor | None = None,
                accent_feature_mask: Tensor | None = None,
                accent_labels: Tensor | None = None,
                token_mask: Tensor | None = None) -> Iterator["AdapterHandle"]:
        """Inside the block, adapted layers route with the utterance-level accent posterior
        of `accent_features` (B, T, D) over its valid frames `accent_feature_mask` (B, T),
        and count only tokens where `token_mask` (B, T') is true when their input's leading
        shape is (B, T') (otherwise every token is valid). `accent_labels` (B,), -1 =
        unknown, feed the accent CE, the oracle router and the statistics."""
        state = self.state
        if state is None:  # none/full/lora: nothing routes
            yield self
            return
        if state.inside:
            raise RuntimeError("handle.routing(...) blocks cannot be nested")
        state.check_pending(wait=False)  # no stream sync per block
        state.clear()
        batch = {n: t.shape[0] for n, t in (("accent_features", accent_features),
                                            ("accent_labels", accent_labels),
                                            ("token_mask", token_mask)) if t is not None}
        if len(set(batch.values())) > 1:
            raise ValueError(f"routing(...) inputs disagree on the batch size: {batch}")
        labels = accent_labels.long() if accent_labels is not None else None
        if self.global_router is not None:
            log_g = self.global_router(accent_features, accent_feature_mask, labels)
            state.log_g = log_g
            if self.cfg.check_finite:
                state.watched.append(("the global accent router", log_g))
            if isinstance(self.global_router, GlobalAccentRouter):
                if self.cfg.lambda_accent > 0:
                    state.accent_ce = accent_cross_entropy(log_g, labels)
                if labels is not None:  # monitoring only: no host sync here
                    known = (labels >= 0).float()
                    hits = (log_g.detach().argmax(-1) == labels).float() * known
                    state.accent_accuracy = hits.sum() / known.sum().clamp_min(1.0)
                if state.statistics_enabled:
                    self.global_statistics.record(log_g, labels)
        state.labels = labels
        state.token_mask = token_mask.bool() if token_mask is not None else None
        state.inside = True
        try:
            yield self
        finally:
            state.inside = False
            state.log_g = state.labels = state.token_mask = None  # keep losses until next block
        state.close_block()  # only on a normal exit: never mask the block's own error

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Weighted auxiliary losses of the last routing block; only enabled, present ones."""
        state, cfg = self.state, self.cfg
        if state is None:
            return {}
        out: dict[str, Tensor] = {}
        if state.accent_ce is not None:
            out["accent_ce"] = cfg.lambda_accent * state.accent_ce
        if state.balance_terms:
            out["load_balance"] = cfg.lambda_balance * torch.stack(state.balance_terms).mean()
        if state.z_terms:
            out["router_z"] = cfg.lambda_z * torch.stack(state.z_terms).mean()
        return out

    def batch_metrics(self) -> dict[str, Tensor]:
        """Monitoring values (not losses): the learned global router's accent accuracy on the
        last routing block's utterances with a known label, and each learned per-layer
        threshold tau (tensors: no host sync here)."""
        state = self.state
        if state is None:
            return {}
        out = {} if state.accent_accuracy is None else {"accent_accuracy": state.accent_accuracy}
        for name, layer in self._layers.items():
            logit, scale = layer_threshold(layer.selection) or (None, None)
            if logit is not None:
                out[f"tau/{name}"] = (scale * torch.sigmoid(logit.detach().float()))
        return out

    def effective_loss_weights(self) -> dict[str, float]:
        """The coefficients that actually apply (0 where a loss cannot exist)."""
        cfg = self.cfg
        learned = isinstance(self.global_router, GlobalAccentRouter)
        local = any(layer.router is not None for layer in self._layers.values())
        return {"accent_ce": cfg.lambda_accent if learned else 0.0,
                "load_balance": cfg.lambda_balance if self.state is not None else 0.0,
                "router_z": cfg.lambda_z if local else 0.0}

    # ----- statistics ---------------------------------------------------------------------
    @property
    def statistics_enabled(self) -> bool:
        return self.state is not None and self.state.statistics_enabled

    @statistics_enabled.setter
    def statistics_enabled(self, value: bool) -> None:
        if self.state is not None:
            self.state.statistics_enabled = value

    def statistics_reset(self) -> None:
        if self.state is not None:
            for stats in self.state.layer_statistics.values():
                stats.reset()
        self.global_statistics.reset()

    def check_finite(self) -> None:
        """Raise now if an earlier routing block saw non-finite router logits (on CUDA that
        check is otherwise deferred to a later block's start, once the flags have reached the
        host, to avoid a stream sync)."""
        if self.state is not None:
            self.state.check_pending()

    def statistics_summary(self) -> dict:
        """JSON-serialisable routing statistics accumulated since the last reset."""
        self.check_finite()
        layers = {}
        if self.state is not None:
            for name, stats in self.state.layer_statistics.items():
                selection = self._layers[name].selection
                layers[name] = stats.summary(selection.current_tau() if selection else None)
        return {"method": self.cfg.method, "selection": self.cfg.selection,
                "num_experts": self.resolved.num_experts,
                "num_accents": self.resolved.num_accents,
                "layers": layers, "global_router": self.global_statistics.summary()}

    # ----- parameters ---------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own weights by stable name (what save_adapter writes)."""
        out: dict[str, nn.Parameter] = {}
        for name, layer in self._layers.items():
            for pname, p in layer.named_parameters():
                if not pname.startswith("base."):
                    out[f"{name}.{pname}"] = p
        for name, linear in self._full_targets.items():
            for pname, p in linear.named_parameters():
                out[f"{name}.{pname}"] = p
        if self.global_router is not None:
            for pname, p in self.global_router.named_parameters():
                out[f"{HANDLE_PREFIX}global_router.{pname}"] = p
        return out

    def lr_scales(self) -> dict[int, float]:
        """Learning-rate multiplier by id() of every adapter parameter whose multiplier is not
        1 (adapter.threshold_lr_scale for the per-layer scalars, router_lr_scale for the
        routers; AdapterConfig)."""
        scale = {"threshold": self.cfg.threshold_lr_scale, "combination": self.cfg.threshold_lr_scale,
                 "local_router": self.cfg.router_lr_scale}
        out: dict[int, float] = {}
        for name, p in self.trainable_parameters().items():
            group = "full" if self._full_targets else _group(name)
            if group == "threshold" and p.dim() > 0:  # AdaMoLE's per-token threshold projection
                group = "local_router"
            if scale.get(group, 1.0) != 1.0:
                out[id(p)] = scale[group]
        return out

    def trainable_report(self, root: nn.Module | None = None) -> TrainableReport:
        """Counts under `root` (default: the injected module) plus the handle's own."""
        root = root if root is not None else self.root
        seen: dict[int, nn.Parameter] = {}
        for module in (root, self):
            for p in module.parameters():
                seen[id(p)] = p
        groups: dict[str, int] = {}
        for name, p in self.trainable_parameters().items():
            group = "full" if self._full_targets else _group(name)
            groups[group] = groups.get(group, 0) + p.numel()
        bases = [layer.base for layer in self._layers.values()] + list(self._full_targets.values())
        target = sum(p.numel() for base in bases for p in base.parameters())
        return TrainableReport(
            total=sum(p.numel() for p in seen.values()),
            trainable=sum(p.numel() for p in seen.values() if p.requires_grad),
            by_group=groups, target_linear_parameters=target)

    def extra_repr(self) -> str:
        weights = ", ".join(f"{k}={v:g}" for k, v in self.effective_loss_weights().items())
        return (f"method={self.cfg.method}, selection={self.cfg.selection}, "
                f"global_router={self.cfg.global_router}, combine={self.cfg.combine}, "
                f"layers={list(self._layers) or list(self._full_targets)}, loss weights: {weights}")


def inject(module: nn.Module, cfg: AdapterConfig, num_accents: int,
           accent_feature_dim: int = 0, fused_layer: bool = True) -> AdapterHandle:
    """Adapt `module` in place according to `cfg` and return its AdapterHandle.

    Everything under `module` is frozen except the adapter weights (`full`: the matched
    linears). `accent_feature_dim` is the width of the features given to routing(...)
    (the speech encoder's output), needed by the learned global router. fused_layer=False
    runs every layer on the generic path (MoLoRALinear; the reference, and the bench)."""
    resolved = cfg.resolve(num_accents)
    if any(isinstance(m, MoLoRALinear) for m in module.modules()):
        raise ValueError(f"{type(module).__name__} already holds adapter layers; inject once")
    module.requires_grad_(False)
    layers: dict[str, MoLoRALinear] = {}
    full_targets: dict[str, nn.Linear] = {}
    state = global_router = None
    if cfg.method == "full":
        full_targets = find_targets(module, cfg.target_modules)
        for linear in full_targets.values():
            linear.requires_grad_(True)
    elif cfg.method in ("lora", "mole"):
        targets = find_targets(module, cfg.target_modules)
        if cfg.method == "mole":
            state = RoutingState(resolved.num_experts, num_accents,
                                 want_balance=cfg.lambda_balance > 0, want_z=cfg.lambda_z > 0)
        for name, linear in targets.items():
            layer = MoLoRALinear(linear, name, cfg, resolved, state, fused_layer)
            module.set_submodule(name, layer)
            layers[name] = layer
            if state is not None:
                state.add_layer(name)
        global_router = build_global_router(cfg, resolved, accent_feature_dim)
        if global_router is not None:
            device = next(iter(targets.values())).weight.device
            global_router.to(device)
    return AdapterHandle(cfg, resolved, module, layers, full_targets, global_router, state,
                         accent_feature_dim)
