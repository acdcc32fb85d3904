"""The exported model of a run: <exp>/model/{weights.safetensors,info.json,done}.

An export holds every tensor that differs from the pre-trained checkpoints named in the model
config: the run's own trainable weights plus those it was initialised from (train.init_from),
so a run is self-contained (the staged base: encoder from 2a + projector/LLM from 2b).
Tensor names are those of the run's model, with its adapter attached: load a run's export
into a model built from the same config (`hdmole.experiment.build_model`, as
`hdmole.experiment.load_decoding_weights` does).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hdmole.fileio import atomic_output
from hdmole.tensors import copy_named_tensors

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
INFO = "info.json"
DONE = "done"  # written last: its content identifies the export (run.sh keys later stages on it)


def export_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "model"


def save_export(run_dir: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    out = export_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).unlink(missing_ok=True)
    with atomic_output(out / WEIGHTS) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp))
    (out / INFO).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / DONE).write_text(f"{run_dir} step={info.get('step')} tensors={len(state)} "
                            f"time={time.strftime('%Y-%m-%dT%H:%M:%S')}\n", encoding="utf-8")
    return out


def load_export(model: nn.Module, run_dir: Path | str, allow_unknown_prefixes: tuple[str, ...] = ("ctc_head.",)
                ) -> set[int]:
    """Copy a finished run's exported tensors into `model`; returns the ids of the tensors
    written (identity survives adapter injection, which renames e.g. `linear1.weight` to
    `linear1.base.weight`).

    Names the model lacks fail (RuntimeError), except under `allow_unknown_prefixes` (an
    encoder-stage CTC head that later stages do not build); those are counted and logged. A
    shape that differs fails with ValueError."""
    out = export_dir(run_dir)
    if not (out / DONE).exists():
        raise FileNotFoundError(f"{out}: no finished export (missing {DONE}); did the run end?")
    saved = load_file(str(out / WEIGHTS))
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    skipped = [n for n in saved if n not in targets and n.startswith(allow_unknown_prefixes)]
    unknown = [n for n in saved if n not in targets and n not in skipped]
    if unknown:
        raise RuntimeError(f"{out / WEIGHTS}: {len(unknown)} tensors not in this model, e.g. {unknown[:5]} "
                           "(was it saved with another adapter or model config?)")
    copy_named_tensors(targets, {n: v for n, v in saved.items() if n not in skipped}, str(out / WEIGHTS))
    if skipped:
        log.info("%s: skipped %d tensors this model does not build (%s...)", out, len(skipped), skipped[0])
    return {id(targets[n]) for n in saved if n not in skipped}


def exported_state(model: nn.Module, loaded: set[int]) -> dict[str, torch.Tensor]:
    """Tensors loaded from init_from (by identity) plus every trainable parameter, by their
    current names."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad or id(p) in loaded}
    out.update({n: b for n, b in model.named_buffers() if id(b) in loaded})
    return out
