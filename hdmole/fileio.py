"""Atomic file output: a reader sees the old file or the complete new one, never half of it.

Every writer in the project (corpus audio, cut sets, feature cache, configs, hypotheses,
checkpoints, exports) goes through `atomic_output`, so a run killed at any moment leaves no
partial file under a final name.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path`, unique per process, ending in `path`'s own suffixes (so
    writers that dispatch on the suffix, lhotse's `.jsonl.gz` or numpy's `.npy`, still work)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{''.join(path.suffixes)}")


@contextmanager
def atomic_output(path: Path | str, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to `path` (atomic on POSIX),
    on failure delete it. `durable`: fsync the file and the directory (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
