"""The provenance every run directory keeps: the command line (appended, one entry per
invocation), the git revision and the package versions. Used by the entry points and by the
library code that writes run directories itself (installing the shipped base)."""
from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "lhotse", "hydra-core", "omegaconf", "numpy",
            "kaldialign", "hdmole")
# The repository (the checkout hdmole is imported from).
ROOT = Path(__file__).resolve().parents[1]


def git_revision(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_provenance(exp_dir: Path, argv: list[str]) -> None:
    """Command line (appended: every invocation), git revision and package versions."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / "command.txt", "a", encoding="utf-8") as f:
        f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} cwd={Path.cwd()}\n")
        f.write(shlex.join([Path(sys.argv[0]).name] + argv) + "\n")
    (exp_dir / "git_revision.txt").write_text(git_revision(ROOT) + "\n", encoding="utf-8")
    (exp_dir / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n", encoding="utf-8")
