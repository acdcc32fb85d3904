"""Training log: TensorBoard scalars plus a JSON-lines file that scoring reads for its plots
(routing statistics such as the thresholds tau over training) without parsing event files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hdmole.runlog import LOG_NAME, read_log  # the log's format; read_log re-exported here

__all__ = ["LOG_NAME", "TrainLogger", "flatten_scalars", "read_log"]


def flatten_scalars(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict/list as {'a/b/0': value} (TensorBoard tags)."""
    out: dict[str, float] = {}
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            out[prefix.rstrip("/")] = float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_scalars(v, f"{prefix}{k}/"))
    elif isinstance(obj, (list, tuple)) and len(obj) <= 64:
        for i, v in enumerate(obj):
            out.update(flatten_scalars(v, f"{prefix}{i}/"))
    return out


class TrainLogger:
    """Writes only on the main rank; other ranks get a logger that does nothing."""

    def __init__(self, exp_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = exp_dir / LOG_NAME
        self._tb = None
        if not enabled:
            return
        exp_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Records written after the checkpoint by the interrupted run are replayed now.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: heavy

        self._tb = SummaryWriter(str(exp_dir / "tensorboard"), purge_step=resume_step)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}, ensure_ascii=False) + "\n")
        for tag, v in flatten_scalars(values).items():
            self._tb.add_scalar(f"{kind}/{tag}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

