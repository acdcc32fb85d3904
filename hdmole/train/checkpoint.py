"""Resumable checkpoints: trainable weights, optimiser, scheduler, loop position and RNG.

Each checkpoint is ONE file written to a temporary name, flushed to disk and renamed over the
old one (os.replace is atomic on POSIX), so a run killed at any moment leaves either the old
or the new checkpoint, never a half-written one under the real name.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hdmole.fileio import atomic_output
from hdmole.tensors import copy_named_tensors


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (requires_grad), by qualified name, on CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into the model's trainable parameters; names must match exactly (else
    RuntimeError), and shapes too (else ValueError)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"{source}: trainable parameters do not match the model "
                           f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    copy_named_tensors(params, state, source)


def rng_state() -> dict[str, Any]:
    """Plain values and tensors only (numpy's key array as a list): load_checkpoint reads with
    weights_only, which refuses numpy arrays."""
    name, key, *rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, key.tolist(), *rest), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to `path` so that readers see the old file or the complete new one."""
    with atomic_output(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def checkpoint_bytes(params: list[torch.Tensor]) -> int:
    """Size of a resumable checkpoint: fp32 weights + AdamW's two moments per trainable value."""
    return 3 * 4 * sum(p.numel() for p in params)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files of saves that never finished (a killed run): never loaded, only
    taking space (at 7B full fine-tuning one is ~90 GB)."""
    stale = sorted(directory.glob(".*.tmp-*")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# Checkpoints written before rng_state() stored plain values hold numpy's uint32 key array:
# these rebuild exactly that (any other numpy dtype or object is still refused).
_LEGACY_RNG_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as data. weights_only: a checkpoint holds tensors and plain values only;
    a full unpickle would run code planted by whoever can write the experiment directory, as
    whoever resumes or decodes."""
    try:
        # mmap: every rank reads the file (FSDP slices its shard out of the full tensors); the
        # page cache holds one copy instead of one per rank (~90 GB each at 7B full fine-tuning).
        with torch.serialization.safe_globals(_LEGACY_RNG_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only refused a pickled object (a callable, a class)
        found = re.search(r"GLOBAL (\S+)", str(e))
        # Not chained: torch's message advises weights_only=False, the one thing not to do here.
        raise RuntimeError(f"refusing checkpoint {path}: it holds {found.group(1) if found else 'a pickled object'}"
                           f", not only tensors and plain values; hdmole never writes that, and loading it could "
                           f"run code. Not loaded") from None
    except Exception as e:  # a truncated file from a broken disk, not from us (we rename)
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path} is not an hdmole training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


CHECKPOINT_FORMAT = "hdmole-train-v1"


def check_writable(directory: Path, min_free_mb: float = 50.0) -> None:
    """Fail before training starts when the experiment directory cannot hold checkpoints."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise RuntimeError(f"experiment directory {directory} is not writable: {e}") from e
    st = os.statvfs(directory)
    free_mb = st.f_bavail * st.f_frsize / 2**20
    if free_mb < min_free_mb:
        raise RuntimeError(f"experiment directory {directory}: only {free_mb:.0f} MiB free, "
                           f"need at least {min_free_mb:.0f} MiB for checkpoints")
