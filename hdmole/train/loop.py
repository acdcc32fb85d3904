"""The training loop: plain PyTorch, single process or torchrun/DDP.

The loop knows three things about the model: `model(batch)` returns an object with `.loss`
(optionally `.asr_loss` and a dict `.aux_losses`); `batch.to(device)` moves a batch; and the
trainable parameters are those with requires_grad. Data and validation come in as callables,
so the loop is the same for the base model, every adapter preset and the tests.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from hdmole.train.checkpoint import (CHECKPOINT_FORMAT, atomic_torch_save, check_writable, checkpoint_bytes,
                                     load_checkpoint, remove_stale_temporaries, rng_state, set_rng_state)
from hdmole.train.config import TrainConfig
from hdmole.train.distributed import DistInfo, any_rank, barrier, broadcast_object, max_over_ranks
from hdmole.train.logger import TrainLogger
from hdmole.train.parallel import build_parallel
from hdmole.train.nan_guard import NonFiniteError, first_nonfinite_grad, first_nonfinite_module
from hdmole.train.schedule import build_scheduler

log = logging.getLogger(__name__)

# train_batches(epoch) -> that epoch's micro-batches. It must depend on `epoch` only (seeded
# shuffling, e.g. sampler.set_epoch(epoch)), so that a resumed run sees the same order.
TrainBatches = Callable[[int], Iterable[Any]]
# validate(model) -> metrics, lower is better for the one named by train.metric.
Validate = Callable[[nn.Module], dict[str, float]]

LAST = "last.pt"
BEST = "best.pt"


@dataclass
class TrainState:
    step: int = 0  # optimiser updates done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float = math.inf
    best_step: int = -1
    bad_validations: int = 0
    elapsed_s: float = 0.0
    stop_reason: str = ""
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite gradient


class _Losses(nn.Module):
    """Adapts `model(batch)` to a dict of tensors: what DDP needs to find the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        losses = {"loss": out.loss}
        for name, value in vars(out).items():  # every other scalar loss term, for the logs
            if name != "loss" and name.endswith("loss") and torch.is_tensor(value) and value.dim() == 0:
                losses[name] = value
        for name, value in (getattr(out, "aux_losses", None) or {}).items():
            losses[f"aux/{name}"] = value
        for name, value in (getattr(out, "metrics", None) or {}).items():  # logged only
            losses[f"metric/{name}"] = value.detach()
        return losses


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and info.enabled:
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(spec)


def model_autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The training autocast dtype: the model's own compute dtype (LLMASR: model.dtype, which its
    forward autocasts to and FSDP gathers parameters in); None (fp32) for a model without one."""
    own = getattr(model, "compute_dtype", None)
    return None if own in (None, torch.float32) else own


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, exp_dir: Path | str, train_batches: TrainBatches,
                 validate: Validate | None = None, routing_stats: Callable[[], dict] | None = None,
                 dist_info: DistInfo | None = None, lr_scales: dict[str, float] | None = None):
        """lr_scales: learning-rate multiplier by parameter name (model.named_parameters()),
        1 for the others; train.lr * multiplier is each one's peak lr."""
        if cfg.metric not in ("cer", "loss"):
            raise ValueError(f"train.metric={cfg.metric!r}; choose cer or loss")
        if cfg.accum_steps < 1:
            raise ValueError(f"train.accum_steps must be >= 1, got {cfg.accum_steps}")
        self.cfg = cfg
        self.exp_dir = Path(exp_dir)
        self.ckpt_dir = self.exp_dir / "checkpoints"
        self.info = dist_info or DistInfo()
        self.device = resolve_device(cfg.device, self.info)
        self.amp_dtype = model_autocast_dtype(model)
        self.model = model.to(self.device)
        self.train_batches = train_batches
        self.validate = validate
        self.routing_stats = routing_stats
        # Wrap (DDP) or shard (FSDP) before the optimiser: sharding replaces the parameters.
        self.parallel = build_parallel(cfg.parallel, self.info, cfg.find_unused_parameters, self.amp_dtype)
        self.losses = self.parallel.wrap(_Losses(self.model), self.model, self.device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad): nothing to train")
        lr_scales = lr_scales or {}
        unknown = sorted(set(lr_scales) - {n for n, _ in named})
        if unknown:
            raise ValueError(f"lr_scales names no trainable parameter: {unknown[:5]}")
        # One group per (lr multiplier, weight decay); biases, norms and thresholds (ndim < 2)
        # never decay. Groups at multiplier 1 come first: the logged lr is group 0's.
        groups: dict[tuple[float, bool], list] = {}
        for name, p in named:
            groups.setdefault((lr_scales.get(name, 1.0), p.ndim >= 2), []).append(p)
        order = sorted(groups, key=lambda key: (key[0] != 1.0, key[0], not key[1]))
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[key], "lr": cfg.lr * key[0], "weight_decay": cfg.weight_decay if key[1] else 0.0}
             for key in order], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        self.state = TrainState()
        time_progress = None
        if cfg.decay_by_time and cfg.max_minutes > 0:
            time_progress = lambda: self.state.elapsed_s / (60 * cfg.max_minutes)  # noqa: E731
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.schedule,
                                         cfg.min_lr_ratio, time_progress)
        self._pending_rng: dict | None = None
        self._first_step = True  # of this process (also after a resume)

    # ---- checkpoints -------------------------------------------------------------------------
    def _save(self, name: str, full: bool) -> None:
        """Every rank calls (FSDP gathers shards); rank 0 writes the one file."""
        trainable = self.parallel.trainable_state(self.model)
        optimizer = self.parallel.optimizer_state(self.model, self.optimizer) if full else None
        if not self.info.is_main:
            return
        ckpt = {"format": CHECKPOINT_FORMAT, "trainable": trainable, "state": asdict(self.state)}
        if full:
            ckpt.update(optimizer=optimizer, scheduler=self.scheduler.state_dict(), rng=rng_state())
        atomic_torch_save(ckpt, self.ckpt_dir / name)

    def _resume(self) -> bool:
        path = self.ckpt_dir / LAST
        if not (self.cfg.resume and path.exists()):
            return False
        ckpt = load_checkpoint(path)  # every rank reads it (exp_dir on a shared file system)
        self.parallel.load_trainable(self.model, ckpt["trainable"], str(path))
        self.parallel.load_optimizer(self.model, self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(**ckpt["state"])
        self._pending_rng = ckpt["rng"]  # restored once the data position is reached
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step, self.state.epoch,
                 self.state.batches_in_epoch)
        return True

    def load_best(self) -> dict[str, Any]:
        """Put the best (else the last) checkpoint's weights into the model; returns its state."""
        for name in (BEST, LAST):
            path = self.ckpt_dir / name
            if path.exists():
                ckpt = load_checkpoint(path)
                self.parallel.load_trainable(self.model, ckpt["trainable"], str(path))
                return ckpt["state"]
        raise FileNotFoundError(f"no checkpoint in {self.ckpt_dir}")

    def full_model(self) -> contextlib.AbstractContextManager:
        """Inside, rank 0 may use the whole model alone (export); every rank must enter."""
        return self.parallel.full_model(self.model)

    # ---- data ----------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[Any]:
        st = self.state
        while st.epoch < self.cfg.max_epochs:
            it = iter(self.train_batches(st.epoch))
            for _ in range(st.batches_in_epoch):  # resume: replay the epoch up to the checkpoint
                if next(it, None) is None:
                    break
            if self._pending_rng is not None:
                set_rng_state(self._pending_rng)
                self._pending_rng = None
            while True:
                batch = next(it, None)
                if any_rank(batch is None, self.info, self.device):  # uneven shards end together
                    break
                st.batches_in_epoch += 1
                yield batch
            st.epoch += 1
            st.batches_in_epoch = 0

    # ---- one optimiser step ----------------------------------------------------------------------
    def _forward(self, batch: Any) -> dict[str, torch.Tensor]:
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return self.losses(batch)

    def _check_finite(self, loss: torch.Tensor, batch: Any) -> None:
        finite = bool(torch.isfinite(loss).all())
        # All ranks stop together: one left in the backward's collectives would wait forever.
        if not any_rank(not finite, self.info, self.device):
            return
        if finite:
            raise NonFiniteError(f"non-finite loss on another rank at step {self.state.step + 1}: see its error")
        # The search re-runs the forward on this rank alone: not possible with sharded weights.
        layer = (first_nonfinite_module(self.model, lambda: self._forward(batch)) if self.parallel.runs_alone
                 else f"not searched under train.parallel={self.parallel.name}")
        ids = getattr(batch, "ids", None)
        raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {self.state.step + 1}, epoch "
                             f"{self.state.epoch}; first non-finite output in layer "
                             f"'{layer or 'none (forward finite on re-run)'}'; batch ids {ids}")

    def _step(self, micro: list[Any]) -> dict[str, float] | None:
        """One optimiser update over the micro-batches; None when it was skipped."""
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            batch = batch.to(self.device)
            sync = i == len(micro) - 1 or not self.info.enabled
            with self.parallel.gradient_sync(self.losses, sync):
                losses = self._forward(batch)
                self._check_finite(losses["loss"], batch)
                (losses["loss"] / len(micro)).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro)
        if self._first_step:
            self.parallel.check_gradients(self.model)
            self._first_step = False
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack(
                [p.grad.detach().norm() for p in self.params if p.grad is not None]))
        norm = torch.tensor(self.parallel.scalar(norm))
        if not torch.isfinite(norm):
            ids = [i for batch in micro for i in (getattr(batch, "ids", None) or [])]
            what = (f"non-finite gradient at step {self.state.step + 1} (loss {sums.get('loss')}): "
                    f"first in parameter '{first_nonfinite_grad(self.model)}'; "
                    f"{len(ids)} utterances in the step: {ids[:20]}{' ...' if len(ids) > 20 else ''}")
            self.state.skipped_steps += 1
            if self.state.skipped_steps > self.cfg.max_skipped_steps:
                raise NonFiniteError(f"{what} (skipped {self.state.skipped_steps - 1} before, "
                                     f"train.max_skipped_steps={self.cfg.max_skipped_steps})")
            log.warning("skipping the update, %s (%d of at most %d)", what, self.state.skipped_steps,
                        self.cfg.max_skipped_steps)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        sums["grad_norm"] = float(norm)
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        return sums

    # ---- validation ------------------------------------------------------------------------------
    def _validate(self, logger: TrainLogger) -> bool:
        """Validate on rank 0, save best/last; returns True when training should stop early."""
        st = self.state
        improved = False
        metrics: dict[str, float] = {}
        with self.parallel.full_model(self.model):
            if self.info.is_main and self.validate is not None:
                self.model.eval()
                with torch.no_grad():
                    metrics = self.validate(self.model)
                self.model.train()
                if self.cfg.metric not in metrics:
                    raise KeyError(f"validation returned {sorted(metrics)}, no train.metric={self.cfg.metric!r}")
                value = metrics[self.cfg.metric]
                improved = value < st.best_metric
                if improved:
                    st.best_metric, st.best_step, st.bad_validations = value, st.step, 0
                else:
                    st.bad_validations += 1
        # Every rank keeps the same loop state (a later resume or early stop must agree).
        best_state = broadcast_object((improved, st.best_metric, st.best_step, st.bad_validations), self.info)
        improved, st.best_metric, st.best_step, st.bad_validations = best_state
        if improved:
            self._save(BEST, full=False)
        stop = self.validate is not None and 0 < self.cfg.early_stop_patience <= st.bad_validations
        if self.info.is_main:
            if self.routing_stats is not None:
                logger.log("routing", st.step, self.routing_stats())
            logger.log("valid", st.step, {**metrics, "best": st.best_metric, "best_step": st.best_step,
                                          "skipped_steps": st.skipped_steps})
        self._save(LAST, full=True)
        barrier(self.info)
        return stop

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        cfg = self.cfg
        error = None
        if self.info.is_main:
            try:  # before the first step: a checkpoint and its temporary copy must fit on the disk
                check_writable(self.exp_dir, min_free_mb=2 * checkpoint_bytes(self.params) / 2**20 + 50)
                remove_stale_temporaries(self.ckpt_dir)
            except RuntimeError as e:
                error = str(e)
        error = broadcast_object(error, self.info)  # every rank stops, none waits for rank 0
        if error:
            raise RuntimeError(error)
        resumed = self._resume()
        st = self.state
        logger = TrainLogger(self.exp_dir, self.info.is_main, st.step if resumed else None)
        self.model.train()
        start = time.monotonic() - st.elapsed_s
        bar = tqdm(total=cfg.max_steps, initial=st.step, desc="train", disable=not self.info.is_main,
                   dynamic_ncols=True, mininterval=2.0)
        batches = self._micro_batches()
        window: dict[str, float] = {}
        try:
            if st.stop_reason == "max_steps" and st.step < cfg.max_steps:
                st.stop_reason = ""  # the user raised max_steps: train on
            if st.stop_reason:
                log.info("%s: training already finished (%s)", self.exp_dir, st.stop_reason)
                return st
            if not resumed and cfg.valid_at_start:  # also with valid_every=0 (only at the end)
                self._validate(logger)
            if st.step >= cfg.max_steps:
                st.stop_reason = "max_steps"
            while not st.stop_reason:
                micro = []
                for batch in batches:
                    micro.append(batch)
                    if len(micro) == cfg.accum_steps:
                        break
                if not micro:
                    st.stop_reason = "max_epochs"
                    break
                values = self._step(micro)
                if values is None:
                    continue
                st.elapsed_s = time.monotonic() - start
                if cfg.max_minutes > 0:  # one clock for all ranks: same stop step, same lr (decay_by_time)
                    st.elapsed_s = max_over_ranks(st.elapsed_s, self.info, self.device)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}", refresh=False)
                for k, v in values.items():
                    window[k] = window.get(k, 0.0) + v
                window["n"] = window.get("n", 0) + 1
                if st.step % cfg.log_every == 0:
                    n = window.pop("n")
                    logger.log("train", st.step, {k: v / n for k, v in window.items()} | {"epoch": st.epoch})
                    window = {}
                out_of_time = cfg.max_minutes > 0 and st.elapsed_s >= 60 * cfg.max_minutes
                if st.step >= cfg.max_steps:
                    st.stop_reason = "max_steps"
                elif out_of_time:
                    st.stop_reason = "max_minutes"
                if cfg.valid_every > 0 and st.step % cfg.valid_every == 0 and not st.stop_reason:
                    if self._validate(logger):
                        st.stop_reason = "early_stop"
                        self._save(LAST, full=True)  # a resume must not train on
                elif cfg.save_every > 0 and st.step % cfg.save_every == 0:
                    self._save(LAST, full=True)
            if st.stop_reason != "early_stop":
                self._validate(logger)  # final: best/last always reflect the end of training
            if st.skipped_steps:
                log.warning("%d update(s) skipped for a non-finite gradient", st.skipped_steps)
            log.info("training stopped (%s) at step %d; best %s=%.4f at step %d", st.stop_reason, st.step,
                     cfg.metric, st.best_metric, st.best_step)
        finally:
            bar.close()
            logger.close()
        return st
