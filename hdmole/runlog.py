"""The JSON-lines log of a run (<exp>/train_log.jsonl): one record per line, {"kind", "step",
...values}. Written by the training logger (hdmole.train.logger.TrainLogger), read by scoring
for its plots (routing statistics such as the thresholds tau over training): this module is the
format both sides share, so scoring needs nothing from the training package."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG_NAME = "train_log.jsonl"


def read_log(exp_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of `exp_dir`'s log (all, or those of one kind); [] when there is no log."""
    path = exp_dir / LOG_NAME
    if not path.exists():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
        if kind is None or rec.get("kind") == kind:
            records.append(rec)
    return records
