"""AdapterConfig: every option of the adapter library, with documented defaults.

The defaults are the HDMoLE method as this project defines it (docs/method.md): one LoRA
expert per accent, hierarchical routing (learned global accent router used as a prior on
per-layer local routers) and a learned per-layer threshold. The presets under conf/adapter/
override a few fields to obtain every baseline.

`__post_init__` checks what a config can check alone (names, ranges); `resolve` checks what
depends on the model (the number of accents) and returns the derived numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, List, Optional

METHODS = ("none", "full", "lora", "mole")
SELECTIONS = ("dense", "topk", "topp", "fixed_threshold", "threshold", "token_threshold")
GLOBAL_ROUTERS = ("learned", "oracle", "none")
COMBINATIONS = ("prior", "sum", "local", "global")
POOLINGS = ("mean", "mean_std")
COMPILE_MODES = ("auto", "true", "false")
TAU_HEADROOM = 1.0 - 1.0e-3


@dataclass
class AdapterConfig:
    # --- what to adapt -------------------------------------------------------------------
    # "none": no adapter (the base preset; what trains is then up to model.freeze_*, all
    # frozen in experiment=adapt); "full": train the matched
    # linears themselves; "lora": one LoRA of rank num_experts*rank per matched linear;
    # "mole": a mixture of LoRA experts per matched linear (routing below).
    method: str = "mole"
    # Regular expressions over qualified nn.Linear names relative to the module given to
    # inject(). A pattern matches a name when it matches the whole name or a whole dotted
    # suffix of it ("linear\d+" matches "linear1" and "proj.linear2"; ".*" matches all).
    target_modules: List[str] = field(default_factory=lambda: [r"linear\d+"])

    # --- experts -------------------------------------------------------------------------
    # Number of LoRA experts per layer; None = one per accent domain (num_accents).
    num_experts: Optional[int] = None
    # Rank of each expert. `lora` uses rank num_experts*rank (matched trainable parameters).
    rank: int = 4
    # Output scale alpha / (the LoRA's own rank), peft's convention: an expert's is alpha/rank,
    # `lora`'s alpha/(num_experts*rank). A mixture's gates sum to 1, so at uniform routing a
    # dense mixture equals one LoRA of the total rank at the same scale.
    alpha: float = 16.0
    # Dropout on the rank activations A x (not on x: the router reads x in the same matrix
    # product as the experts' A, see docs/method.md).
    dropout: float = 0.05

    # --- selection: which experts are active per token -----------------------------------
    # dense: all experts, weights p. topk: k largest p, renormalised. topp: smallest set whose
    # cumulative p reaches top_p, weights p (not renormalised). fixed_threshold: constant tau.
    # threshold: learned tau per layer (HDMoLE). token_threshold: tau(x) per token (AdaMoLE).
    # Threshold weights are (p_i - tau) / sum_{j in S} (p_j - tau) over S = {p_i > tau}.
    selection: str = "threshold"
    top_k: int = 2
    top_p: float = 0.8
    # Upper bound of learned thresholds; None = 1/num_experts, which guarantees >= 1 expert.
    tau_max: Optional[float] = None
    # Initial threshold logit theta (tau = tau_max * sigmoid(theta)); 0 starts at tau_max/2.
    # For token_threshold it initialises the bias of the threshold projection.
    threshold_init: float = 0.0
    # Constant tau for fixed_threshold; None = tau_max/2 (the learned threshold's start).
    fixed_tau: Optional[float] = None

    # --- routing -------------------------------------------------------------------------
    # Utterance-level accent router: "learned" (pooled speech-encoder output -> MLP ->
    # softmax over accents), "oracle" (one-hot true accent label), "none" (no hierarchy).
    global_router: str = "learned"
    # How the global posterior g and the local router's logits l combine into p:
    # prior = softmax(l + beta*log g); sum = gamma*g + (1-gamma)*softmax(l);
    # local = softmax(l) (requires global_router none); global = g (no local router).
    combine: str = "prior"
    beta: float = 1.0
    learn_beta: bool = True
    gamma: float = 0.5
    # Hidden size and pooling ("mean" or "mean_std", both over valid frames only) of the
    # global router's MLP.
    global_hidden: int = 256
    global_pooling: str = "mean"
    # Std of the normal init of local-router (and token-threshold) weights.
    router_init_std: float = 0.02

    # --- optimisation ----------------------------------------------------------------------
    # Learning-rate multipliers (train.lr times this). Adam moves every parameter by about lr
    # per step, whatever its gradient's size: a per-layer threshold logit or beta would move
    # about 0.2 over a short run (tau barely changes), while a router reading un-normalised
    # inputs shifts every token's logits by about ||x||_1 * lr per step.
    # threshold_lr_scale: the per-layer scalars (threshold logits theta, beta).
    # router_lr_scale: the linears on a layer's input (local routers, AdaMoLE's per-token
    # threshold projection); not the global accent router (LayerNorm on its pooled input,
    # trained by the accent cross-entropy).
    # Defaults chosen on the accent dev set (docs/method.md section 4b, RESULTS.md).
    threshold_lr_scale: float = 30.0
    router_lr_scale: float = 0.1

    # --- auxiliary losses (already weighted in AdapterHandle.auxiliary_losses) ------------
    # Accent cross-entropy of the learned global router (ignored for other global routers).
    lambda_accent: float = 0.1
    # Mask-aware Switch load balancing over local routing, mean over layer calls (0.01:
    # MixLoRA's coefficient; on the accent dev set it keeps hdmole's first layer from sending
    # every token to one expert, docs/method.md section 4b).
    lambda_balance: float = 0.01
    # Router z-loss (mean squared log-sum-exp of local logits), mean over layer calls.
    lambda_z: float = 0.0

    # Raise when router logits are not finite (their routing turns NaN), naming the layer.
    # One check per routing block for all layers, when it closes (CPU) or, on CUDA, without a
    # stream sync at the next block's start or at handle.check_finite(); immediately for
    # layers called outside a block.
    check_finite: bool = True
    # torch.compile of each routed layer's arithmetic (fused.py): "auto" = compiled on CUDA
    # while gradients are enabled (training), eager on CPU, in inference and in CUDA-graph
    # capture (no compiler needed for CI or decoding); "true" = compiled wherever possible,
    # LoRA layers too; "false" = always eager. All paths compute the same values; a compile
    # failure warns and falls back to eager.
    compile: str = "auto"

    def __post_init__(self) -> None:
        def choice(key: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"adapter.{key}={value!r} is not one of {', '.join(allowed)}")

        choice("method", METHODS)
        choice("selection", SELECTIONS)
        choice("global_router", GLOBAL_ROUTERS)
        choice("combine", COMBINATIONS)
        choice("global_pooling", POOLINGS)
        if isinstance(self.compile, bool):  # YAML true/false
            self.compile = "true" if self.compile else "false"
        choice("compile", COMPILE_MODES)
        if isinstance(self.target_modules, str):
            raise ValueError("adapter.target_modules must be a list of patterns, not a string")
        positive = {"rank": self.rank, "top_k": self.top_k, "global_hidden": self.global_hidden}
        if self.num_experts is not None:
            positive["num_experts"] = self.num_experts
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"adapter.{key}={value} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"adapter.top_p={self.top_p} must be in (0, 1]")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"adapter.gamma={self.gamma} must be in [0, 1]")
        for key in ("threshold_lr_scale", "router_lr_scale"):
            if not getattr(self, key) > 0:
                raise ValueError(f"adapter.{key}={getattr(self, key)} must be > 0")
        for key in ("lambda_accent", "lambda_balance", "lambda_z", "router_init_std"):
            if getattr(self, key) < 0:
                raise ValueError(f"adapter.{key}={getattr(self, key)} must be >= 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdapterConfig":
        """Strict construction: an unknown key fails, naming it and the known keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown adapter config key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, num_accents: int) -> "ResolvedAdapter":
        """Checks that depend on the accent count; returns the derived numbers."""
        if num_accents < 1:
            raise ValueError(f"num_accents={num_accents} must be >= 1")
        experts = self.num_experts if self.num_experts is not None else num_accents
        if self.method == "mole":
            hierarchical = self.global_router != "none"
            if hierarchical and experts != num_accents:
                raise ValueError(
                    f"adapter.num_experts={experts} does not fit {num_accents} accents: "
                    f"global_router={self.global_router!r} maps expert i to accent i; set "
                    f"num_experts to {num_accents} (or null) or global_router to 'none'")
            if hierarchical and self.combine == "local":
                raise ValueError(
                    f"adapter.combine='local' ignores global_router={self.global_router!r}; "
                    "set global_router='none' or combine to prior/sum/global")
            if not hierarchical and self.combine != "local":
                raise ValueError(
                    f"adapter.combine={self.combine!r} needs a global router; with "
                    "global_router='none' use combine='local'")
            if self.selection == "topk" and self.top_k > experts:
                raise ValueError(f"adapter.top_k={self.top_k} exceeds num_experts={experts}")
            if self.combine == "global" and self.selection == "token_threshold":
                raise ValueError("adapter.selection='token_threshold' needs per-token routing; "
                                 "combine='global' routes whole utterances")
            if self.combine == "global" and self.lambda_z > 0:
                raise ValueError("adapter.lambda_z > 0 needs local router logits; "
                                 "combine='global' has none")
        tau_max = self.tau_max if self.tau_max is not None else 1.0 / experts
        if not 0.0 < tau_max <= 1.0 / experts:
            raise ValueError(f"adapter.tau_max={tau_max} must be in (0, 1/num_experts="
                             f"{1.0 / experts:.4g}] so that at least one expert stays active")
        fixed_tau = self.fixed_tau if self.fixed_tau is not None else tau_max / 2
        if not 0.0 <= fixed_tau < 1.0 / experts:
            raise ValueError(f"adapter.fixed_tau={fixed_tau} must be in [0, 1/num_experts="
                             f"{1.0 / experts:.4g}) so that at least one expert stays active")
        # Thresholds stay TAU_HEADROOM below 1/E: max_i p_i >= 1/E up to fp32 rounding of
        # the softmax (~1e-7 relative), so the arg-max expert is always strictly above tau.
        ceiling = TAU_HEADROOM / experts
        return ResolvedAdapter(num_experts=experts, tau_max=min(tau_max, ceiling),
                               fixed_tau=min(fixed_tau, ceiling), num_accents=num_accents)


@dataclass(frozen=True)
class ResolvedAdapter:
    """Numbers derived from an AdapterConfig and the accent count."""
    num_experts: int
    tau_max: float
    fixed_tau: float
    num_accents: int
