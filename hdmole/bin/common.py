"""Shared by the entry points: logging, and the provenance every run directory keeps
(hdmole.provenance, re-exported here)."""
from __future__ import annotations

import logging
import sys

from hdmole.provenance import PACKAGES, git_revision, save_provenance, versions

__all__ = ["PACKAGES", "git_revision", "save_provenance", "setup_logging", "versions"]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
