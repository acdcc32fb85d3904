"""What several test files share. Tests write only under temporary paths: run.sh runs in a copy
of the recipe, and hypothesis keeps its database and caches out of the checkout."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

ROOT = Path(__file__).resolve().parents[1]

settings.register_profile("no_database", database=None)
settings.load_profile("no_database")


def pytest_configure(config) -> None:
    """hypothesis caches what it learns (examples, constants of the tested modules, read at
    collection) in ./.hypothesis by default: a temporary directory instead, removed at the end."""
    config.hypothesis_home = tempfile.mkdtemp(prefix="hdmole-hypothesis-")
    set_hypothesis_home_dir(config.hypothesis_home)


def pytest_unconfigure(config) -> None:
    shutil.rmtree(getattr(config, "hypothesis_home", ""), ignore_errors=True)


def copy_recipe(dest: Path) -> Path:
    """The recipe's own files in `dest` (run.sh, what it sources and reads, recipes/) with the
    library, tools and the shipped base linked: run.sh there writes its data/ and exp/ under
    `dest`, as an ESPnet egs directory beside the library does."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("run.sh", "path.sh", "db.sh"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("conf", "utils", "recipes"):
        shutil.copytree(ROOT / name, dest / name)
    for name in ("hdmole", "tools", "pretrained"):
        (dest / name).symlink_to(ROOT / name)
    return dest


def recipe_env() -> dict[str, str]:
    """The environment for a recipe copy: this interpreter's environment (path.sh activates it)."""
    return {**os.environ, "HDMOLE_VENV": sys.prefix}
