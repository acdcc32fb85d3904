"""Stages 2-3: train one run (base model phase or adaptation) from Hydra overrides.

    hdmole-train experiment=adapt adapter=hdmole exp_dir=exp/x/hdmole train.init_from=exp/x/base
    torchrun --nproc-per-node 2 -m hdmole.bin.train ...        (DDP; gloo on CPU)

Writes <exp_dir>/{config.yaml,command.txt,git_revision.txt,versions.json,train_log.jsonl,
tensorboard/,checkpoints/{last,best}.pt,model/,model_info.json}. A rerun with the same config
resumes from checkpoints/last.pt; a changed config starts the run afresh.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from hdmole.bin.common import save_provenance, setup_logging
from hdmole.config import RESOLVED_NAME, compose_config, load_resolved, save_resolved, to_object
from hdmole.data.accents import ACCENTS
from hdmole.train.distributed import DistInfo, cleanup_distributed, init_distributed
from hdmole.train.export import exported_state, load_export, save_export
from hdmole.train.loop import Trainer

log = logging.getLogger("hdmole.train")

# Cut sets per phase: the base learns the source domain, adaptation the accents.
SOURCE, TARGET = "aishell", "kespeech"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(cfg, cuts_path: Path, num_mel_bins: int, train: bool, info: DistInfo, epoch: int = 0,
                shuffle: bool | None = None) -> Iterable:
    """The data package's loader for one cut set; training batches are shuffled by
    (seed, epoch) only, so a resumed run sees the same order, and sharded by DDP rank."""
    from hdmole.data.dataset import make_dataloader

    if not cuts_path.exists():
        raise FileNotFoundError(f"{cuts_path} missing: run stage 1 (cut sets)")
    loader = make_dataloader(cuts_path, cfg.data, num_mel_bins, shuffle=train if shuffle is None else shuffle,
                             rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                             drop_last=False)
    # drop_last=False also under DDP: lhotse's bucketing sampler drops every bucket's partial
    # batch, on a small corpus all of them (0 batches on the ci corpus); the loop ends an epoch
    # on all ranks when any rank runs out (hdmole.train.distributed.any_rank), so no hang.
    if train:
        loader.sampler.set_epoch(epoch)
    return loader


def routing_handle(model) -> Any:
    handle = getattr(model, "adapter", None)
    return handle if handle is not None and hasattr(handle, "statistics_summary") else None


def make_validate(cfg, model, dev_path: Path, use_ctc: bool) -> tuple[Callable, Callable[[], dict]]:
    """validate(model) -> {loss, cer} on the dev set; routing() -> the dev routing statistics."""
    from hdmole.decode import generation_kwargs
    from hdmole.score import corpus_cer

    last_routing: dict = {}
    info = DistInfo()

    def validate(m) -> dict[str, float]:
        handle = routing_handle(m)
        if handle is not None:
            handle.statistics_reset()
            handle.statistics_enabled = True
        losses, refs, hyps = [], [], []
        try:
            # A dev subset (valid_max_batches) is a fixed random draw, so that it mixes the
            # accents (cut sets are sorted by id, i.e. grouped by accent) and stays comparable.
            subset = cfg.train.valid_max_batches > 0
            for i, batch in enumerate(make_loader(cfg, dev_path, m.num_mel_bins, False, info, shuffle=subset)):
                if cfg.train.valid_max_batches and i >= cfg.train.valid_max_batches:
                    break
                losses.append(float(m(batch).loss))
                out = m.ctc_transcribe(batch) if use_ctc else m.transcribe(batch, **generation_kwargs(cfg.decode))
                # CTC hypotheses are in the head's units (numbered pinyin for ctc_units=pinyin).
                refs += [m.ctc_reference(t) for t in batch.texts] if use_ctc else batch.texts
                hyps += [out[u] for u in batch.ids]
        finally:
            if handle is not None:
                last_routing.clear()
                last_routing.update(handle.statistics_summary())
                handle.statistics_enabled = False
        if not losses:
            raise ValueError(f"{dev_path}: no dev batches")
        return {"loss": sum(losses) / len(losses), "cer": corpus_cer(refs, hyps)}

    return validate, lambda: dict(last_routing)


def fresh_start_if_config_changed(cfg, exp_dir: Path, info: DistInfo) -> None:
    """Resume only a run with the identical config; otherwise clear its checkpoints."""
    from omegaconf import OmegaConf

    old = exp_dir / RESOLVED_NAME
    if not info.is_main or not old.exists():
        return
    if OmegaConf.to_yaml(cfg, resolve=True) != old.read_text(encoding="utf-8"):
        log.warning("%s: config changed since the last run; starting afresh (old checkpoints removed)", exp_dir)
        for sub in ("checkpoints", "model", "tensorboard"):
            shutil.rmtree(exp_dir / sub, ignore_errors=True)
        for name in ("train_log.jsonl", "model_info.json"):
            (exp_dir / name).unlink(missing_ok=True)


def build_model(cfg, device: str | None = None):
    """The model of a run before training: pre-trained parts, init_from's export, adapter."""
    from hdmole.model import LLMASR

    model = LLMASR.from_config(cfg.model, device=device)
    loaded: set[int] = set()
    if cfg.train.init_from:
        init_cfg = load_resolved(Path(cfg.train.init_from))
        if init_cfg.adapter.method != "none":
            raise ValueError(f"train.init_from={cfg.train.init_from} was trained with adapter "
                             f"{init_cfg.adapter.method!r}; initialise from a run without adapter (a base model)")
        loaded = load_export(model, cfg.train.init_from)
    if cfg.adapter.method != "none":
        model.attach_adapter(cfg.adapter, num_accents=len(ACCENTS))
    return model, loaded


def model_info(model, state) -> dict:
    handle = getattr(model, "adapter", None)
    info = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "full_params": None, "step": state.step if state else 0,
            "stop_reason": state.stop_reason if state else "no trainable parameters",
            "best_metric": state.best_metric if state else None, "best_step": state.best_step if state else None}
    if handle is not None and hasattr(handle, "trainable_report"):
        report = handle.trainable_report(model)
        info["full_params"] = report.target_linear_parameters
        info["adapter_report"] = report.table
    return info


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    setup_logging()
    dcfg = compose_config(argv)
    cfg = to_object(dcfg)
    info = init_distributed(cfg.train.device)
    exp_dir = Path(cfg.exp_dir)
    try:
        fresh_start_if_config_changed(dcfg, exp_dir, info)
        if info.is_main:
            save_resolved(dcfg, exp_dir)
            save_provenance(exp_dir, argv)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        seed_everything(cfg.train.seed)
        device = None if cfg.train.device == "auto" else cfg.train.device
        if info.enabled and torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
            device = f"cuda:{info.local_rank}"
        model, loaded = build_model(cfg, device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        state, trainer = None, None
        if not trainable:
            if cfg.adapter.method != "none":
                raise ValueError("nothing to train: check the model freeze_* flags and the adapter preset")
            log.info("adapter=none and everything frozen: exporting the initial model unchanged")
        else:
            phase_source = cfg.adapter.method == "none"  # base training: source domain
            corpus = SOURCE if phase_source else TARGET
            train_path, dev_path = cfg.data.cuts_path(corpus, "train"), cfg.data.cuts_path(corpus, "dev")
            use_ctc = cfg.model.asr_weight == 0
            validate, routing = make_validate(cfg, model, dev_path, use_ctc)
            trainer = Trainer(model, cfg.train, exp_dir,
                              lambda epoch: make_loader(cfg, train_path, model.num_mel_bins, True, info, epoch),
                              validate=validate, routing_stats=routing if routing_handle(model) else None,
                              dist_info=info)
            state = trainer.fit()
            trainer.load_best()
        # FSDP: every rank gathers the shards, rank 0 exports the whole model.
        with trainer.full_model() if trainer is not None else contextlib.nullcontext():
            if info.is_main:
                info_json = model_info(model, state)
                (exp_dir / "model_info.json").write_text(json.dumps(info_json, indent=1) + "\n", encoding="utf-8")
                save_export(exp_dir, exported_state(model, loaded), info_json)
                log.info("exported %s (%s trainable parameters)", exp_dir / "model",
                         f"{info_json['trainable_params']:,}")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
