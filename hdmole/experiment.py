"""Building a run: the model of an experiment config, its data loaders, validation, weights
and report. The entry points (hdmole.bin.*) parse arguments and call these (so do the tests).

    train_run(cfg)                  stage 2/3: train one run into cfg.exp_dir and export it
    build_model(cfg)                the model before training (pre-trained parts, init_from, adapter)
    load_decoding_weights(...)      a finished run's weights for decoding
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from hdmole.config import RESOLVED_NAME, load_resolved, save_resolved, to_object
from hdmole.data.accents import ACCENTS
from hdmole.data.dataset import make_dataloader
from hdmole.decode import generation_kwargs, transcribe_batches, write_set
from hdmole.model import LLMASR
from hdmole.model.encoder_cache import EncoderOutputCache, encoder_fingerprint
from hdmole.score import corpus_cer
from hdmole.train.checkpoint import load_checkpoint, load_trainable_state
from hdmole.train.distributed import DistInfo, cleanup_distributed, init_distributed
from hdmole.train.export import exported_state, load_export, save_export
from hdmole.train.loop import LAST, Trainer

log = logging.getLogger("hdmole.experiment")
DEFAULT_TEST_SETS = ("kespeech_test", "aishell_test")

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
    if not cuts_path.exists():
        raise FileNotFoundError(f"{cuts_path} missing: run stage 1 (cut sets, features)")
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


def same_config(cfg, exp_dir: Path) -> bool:
    """Whether exp_dir holds a run of exactly this (composed) config."""
    old = exp_dir / RESOLVED_NAME
    return old.exists() and OmegaConf.to_yaml(cfg, resolve=True) == old.read_text(encoding="utf-8")


def fresh_start_if_config_changed(cfg, exp_dir: Path, info: DistInfo) -> None:
    """Resume only a run with the identical config; otherwise clear its checkpoints."""
    if not info.is_main or not (exp_dir / RESOLVED_NAME).exists():
        return
    if not same_config(cfg, exp_dir):
        log.warning("%s: config changed since the last run; starting afresh (old checkpoints removed)", exp_dir)
        for sub in ("checkpoints", "model", "tensorboard"):
            shutil.rmtree(exp_dir / sub, ignore_errors=True)
        for name in ("train_log.jsonl", "model_info.json"):
            (exp_dir / name).unlink(missing_ok=True)


def build_model(cfg, device: str | None = None):
    """The model of a run before training: pre-trained parts, init_from's export, adapter."""
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


def parameter_lr_scales(model) -> dict[str, float]:
    """The adapter's learning-rate multipliers (AdapterHandle.lr_scales) by parameter name."""
    handle = getattr(model, "adapter", None)
    by_id = handle.lr_scales() if handle is not None and hasattr(handle, "lr_scales") else {}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def attach_encoder_cache(cfg, model: LLMASR, cut_sets: list[Path]) -> None:
    """Reuse the frozen encoder's outputs of `cut_sets` (data.encoder_cache_dir; see
    hdmole.model.encoder_cache). Skipped, with a log line, where they would not be exact."""
    if not cfg.data.encoder_cache_dir:
        return
    if not cfg.model.freeze_encoder or cfg.model.specaug_freq_masks or cfg.model.specaug_time_masks:
        log.info("data.encoder_cache_dir ignored: the encoder trains or SpecAugment is on")
        return
    encoder = model.encoder
    cache = EncoderOutputCache(cfg.data.encoder_cache_dir, encoder_fingerprint(
        encoder, encoder.pad_to_30s, encoder.keep_padding, model.num_mel_bins))
    info = DistInfo()  # every rank fills the whole cache in the same order
    was_training = model.training
    model.eval()
    # Iterating a DataLoader draws its base seed from the global torch generator: without the
    # fork, a run that computes the cache would then draw other dropout masks than one that
    # loads it, and the same command would give two results.
    with torch.random.fork_rng(devices=[]):
        try:
            for path in cut_sets:
                cache.fill(path, make_loader(cfg, path, model.num_mel_bins, False, info), model.encode)
        finally:
            model.train(was_training)
    model.use_encoder_cache(cache)


def load_decoding_weights(model, exp_dir: Path, checkpoint: str) -> None:
    """The run's own export (its best checkpoint, over init_from's weights); for "last", the
    trainable weights of checkpoints/last.pt over that."""
    load_export(model, exp_dir)
    if checkpoint == "last":
        path = exp_dir / "checkpoints" / LAST
        if not path.exists():
            raise FileNotFoundError(f"decode.checkpoint=last: {path} does not exist")
        load_trainable_state(model, load_checkpoint(path)["trainable"], str(path))


def train_run(dcfg: DictConfig, provenance: Callable[[Path], None] | None = None) -> None:
    """Train the run `dcfg` describes (a composed experiment config) and export its model;
    `provenance(exp_dir)` records the command that asked for it."""
    cfg = to_object(dcfg)
    info = init_distributed(cfg.train.device)
    exp_dir = Path(cfg.exp_dir)
    try:
        fresh_start_if_config_changed(dcfg, exp_dir, info)
        if info.is_main:
            save_resolved(dcfg, exp_dir)
            if provenance is not None:
                provenance(exp_dir)
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
            train_path, dev_path = (cfg.data.feature_cuts_path(corpus, split) for split in ("train", "dev"))
            attach_encoder_cache(cfg, model, [train_path, dev_path])  # leaves the RNG state as it was
            use_ctc = cfg.model.asr_weight == 0
            validate, routing = make_validate(cfg, model, dev_path, use_ctc)
            trainer = Trainer(model, cfg.train, exp_dir,
                              lambda epoch: make_loader(cfg, train_path, model.num_mel_bins, True, info, epoch),
                              validate=validate, routing_stats=routing if routing_handle(model) else None,
                              dist_info=info, lr_scales=parameter_lr_scales(model))
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


def decode_run(cfg, exp_dir: Path) -> None:
    """Stage 4: decode the test sets (decode.test_sets, default every one) with the finished
    run in `exp_dir` (cfg: its saved config, decode.* possibly overridden) into
    <exp_dir>/decode/<set>/."""
    device = None if cfg.decode.device == "auto" else cfg.decode.device
    model, _ = build_model(cfg, device)
    load_decoding_weights(model, exp_dir, cfg.decode.checkpoint)
    model.eval()
    handle = routing_handle(model)
    sets = list(cfg.decode.test_sets) or list(DEFAULT_TEST_SETS)
    if not cfg.decode.max_utterances:  # whole sets: their encoder outputs serve every later run
        attach_encoder_cache(cfg, model, [cfg.data.feature_cuts_path(*name.split("_", 1)) for name in sets])
    kwargs = generation_kwargs(cfg.decode)
    for name in sets:
        corpus, _, split = name.partition("_")
        path = cfg.data.feature_cuts_path(corpus, split)
        start = time.time()
        if handle is not None:
            handle.statistics_reset()
            handle.statistics_enabled = True
        refs: dict[str, str] = {}
        accents: dict[str, str] = {}

        def batches():  # streams the test set, keeping references and accents by utterance id
            n = 0
            for batch in make_loader(cfg, path, model.num_mel_bins, False, DistInfo()):
                if cfg.decode.max_utterances and n >= cfg.decode.max_utterances:
                    return
                n += len(batch)
                for utt, text, acc in zip(batch.ids, batch.texts, batch.accents.tolist()):
                    refs[utt] = text
                    accents[utt] = ACCENTS[acc] if acc >= 0 else "unknown"
                yield batch

        hyps = transcribe_batches(lambda b: model.transcribe(b, **kwargs), batches(), desc=name)
        routing = handle.statistics_summary() if handle is not None else None
        write_set(exp_dir / "decode" / name, hyps, refs, accents, routing)
        log.info("%s: %d utterances in %.1f s -> %s", name, len(hyps), time.time() - start, exp_dir / "decode" / name)

