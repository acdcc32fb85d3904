"""How the training loop runs across processes: one process, DDP, or FSDP2 (`train.parallel`).

torchrun starts the processes (hdmole.train.distributed); a strategy here decides how the
model and its optimiser state are spread over them. The loop only talks to the interface of
`SingleProcess`, so the three strategies are interchangeable:

- single: world size 1 (plain `python -m hdmole.bin.train`).
- ddp:    every rank holds the whole model; gradients are averaged (adapter training: only a few
          million trainable parameters, frozen 7B LLM replicated in bf16).
- fsdp:   FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and Adam states
          sharded over the ranks, one unit per transformer block (full fine-tuning at 7B scale).

Checkpoints stay single files holding full (unsharded) trainable tensors, written by rank 0,
so a run can resume with a different number of processes.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from hdmole.train.checkpoint import load_trainable_state, trainable_state
from hdmole.train.distributed import DistInfo

log = logging.getLogger(__name__)


class SingleProcess:
    """World size 1: the model as is."""

    name = "single"
    runs_alone = True  # one rank can run a forward without the others (no collectives inside)

    def __init__(self, info: DistInfo, find_unused_parameters: bool = False,
                 amp_dtype: torch.dtype | None = None):
        self.info = info
        self.find_unused_parameters = find_unused_parameters
        self.amp_dtype = amp_dtype

    def wrap(self, losses: nn.Module, model: nn.Module, device: torch.device) -> nn.Module:
        """Prepare `model` (in place) and return the module the loop calls for the losses.
        Called before the optimiser is built: sharding replaces the parameters."""
        return losses

    def gradient_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward; sync=False on all but the last micro-batch."""
        return contextlib.nullcontext()

    def check_gradients(self, model: nn.Module) -> None:
        """Called after the first step's backward."""

    def scalar(self, value: torch.Tensor) -> float:
        return float(value)

    # ---- checkpoints: collective (every rank calls), rank 0 gets the full values -----------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return trainable_state(model)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return optimizer.state_dict()

    def load_trainable(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        load_trainable_state(model, state, source)

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    @contextlib.contextmanager
    def full_model(self, model: nn.Module) -> Iterator[None]:
        """Inside: every rank holds the full model and rank 0 may run it alone (validation,
        export). Every rank must enter."""
        yield


class DataParallel(SingleProcess):
    """torch DistributedDataParallel: replicated model, averaged gradients."""

    name = "ddp"

    def wrap(self, losses: nn.Module, model: nn.Module, device: torch.device) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every adapter preset and base stage uses all its trainable parameters in every step
        # (tests/test_distributed.py checks each preset), so DDP need not search the graph
        # for unused ones each step; check_gradients catches a model where that is not so.
        log.info("DDP: %d ranks, find_unused_parameters=%s", self.info.world_size, self.find_unused_parameters)
        # broadcast_buffers off: the only buffers (rotary tables) never change, so rank 0's
        # copy need not be sent before every forward.
        return DDP(losses, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=self.find_unused_parameters, broadcast_buffers=False)

    def gradient_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else wrapped.no_sync()

    def check_gradients(self, model: nn.Module) -> None:
        if self.find_unused_parameters:
            return
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise RuntimeError(f"DDP: {len(unused)} trainable parameters got no gradient in the first step "
                               f"({unused[:5]}{'...' if len(unused) > 5 else ''}); this model uses parameters "
                               f"conditionally: set train.find_unused_parameters=true")

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return trainable_state(model) if self.info.is_main else None  # replicas are identical

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return optimizer.state_dict() if self.info.is_main else None


def fsdp_unit_classes(model: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: the Hugging Face `_no_split_modules`
    convention (Qwen2DecoderLayer, WhisperEncoderLayer, ...), declared by any submodule."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return names


class FullyShardedDataParallel(SingleProcess):
    """FSDP2: each transformer block is one unit, everything else (embeddings, projector,
    adapters, heads) lives in the root unit. Parameters become DTensors sharded on dim 0."""

    name = "fsdp"
    runs_alone = False  # every forward all-gathers the shards

    def wrap(self, losses: nn.Module, model: nn.Module, device: torch.device) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        # bf16: gather parameters in bf16 (half the traffic), reduce gradients in fp32.
        mp = (MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32)
              if self.amp_dtype is not None else MixedPrecisionPolicy())
        classes = fsdp_unit_classes(model)
        units = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
        for unit in units:
            fully_shard(unit, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self._root = model
        self._units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        log.info("FSDP2: %d sharded blocks (%s) + root, %d ranks", len(units), ", ".join(sorted(classes)) or "none",
                 self.info.world_size)
        return losses

    def gradient_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        self._root.set_requires_gradient_sync(sync)  # sync=False: keep unsharded grads, no reduce-scatter
        return contextlib.nullcontext()

    def scalar(self, value: torch.Tensor) -> float:
        from torch.distributed.tensor import DTensor

        return float(value.full_tensor() if isinstance(value, DTensor) else value)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if isinstance(p, DTensor) else p  # all-gather: every rank
                if self.info.is_main:
                    out[name] = full.detach().to("cpu", copy=True)
        return out if self.info.is_main else None

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.info.is_main else None

    def load_trainable(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(params) != set(state):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise RuntimeError(f"{source}: trainable parameters do not match the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():
            for name, p in params.items():
                value = state[name]
                if tuple(value.shape) != tuple(p.shape):
                    raise RuntimeError(f"{source}: {name} has shape {tuple(value.shape)}, model expects "
                                       f"{tuple(p.shape)}")
                if isinstance(p, DTensor):  # every rank read the same file: slice locally
                    local = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements,
                                              src_data_rank=None).to_local()
                    p.to_local().copy_(local)
                else:
                    p.copy_(value)

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    @contextlib.contextmanager
    def full_model(self, model: nn.Module) -> Iterator[None]:
        # All-gather every unit and keep it gathered through forwards, so rank 0 can run the
        # model (and its non-forward methods, e.g. transcribe) without collectives.
        for unit in self._units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            dist.barrier()
            for unit in self._units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)


STRATEGIES: dict[str, type[SingleProcess]] = {"ddp": DataParallel, "fsdp": FullyShardedDataParallel}


def build_parallel(name: str, info: DistInfo, find_unused_parameters: bool = False,
                   amp_dtype: torch.dtype | None = None) -> SingleProcess:
    """The strategy for train.parallel=`name`; one process always runs `SingleProcess`."""
    if name not in STRATEGIES:
        raise ValueError(f"train.parallel={name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name] if info.enabled else SingleProcess
    return cls(info, find_unused_parameters, amp_dtype)
