"""hdmole.adapters: torch-only library of LoRA experts for any nn.Linear.

Fused expert bank (MoLoRALinear), global accent router and per-layer local routers,
selection strategies (dense, top-k, top-p, fixed/learned per-layer/per-token thresholds),
auxiliary losses, inject/save/load/merge and routing statistics. See docs/method.md.
"""
from .config import AdapterConfig, ResolvedAdapter
from .inject import AdapterHandle, TrainableReport, find_targets, inject
from .io import load_adapter, load_adapter_config, merge, save_adapter
from .layer import MoLoRALinear
from .routing import COMBINATION_REGISTRY, GlobalAccentRouter, OracleAccentRouter
from .selection import SELECTION_REGISTRY, threshold_weights

__all__ = [
    "AdapterConfig", "ResolvedAdapter", "AdapterHandle", "TrainableReport", "find_targets",
    "inject", "load_adapter", "load_adapter_config", "merge", "save_adapter", "MoLoRALinear",
    "COMBINATION_REGISTRY", "GlobalAccentRouter", "OracleAccentRouter", "SELECTION_REGISTRY",
    "threshold_weights",
]
