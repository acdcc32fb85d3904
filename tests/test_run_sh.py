"""run.sh option handling and the option parser (utils/parse_options.sh)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import copy_recipe, recipe_env

ROOT = Path(__file__).resolve().parents[1]

DEMO = """
set -euo pipefail
stage=0
stop_stage=5
train_args=""
use_x=true
help_message="Usage: demo [--stage N]"
. utils/parse_options.sh
printf '%s|%s|%s|%s\\n' "$stage" "$stop_stage" "$train_args" "$use_x"
"""


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", DEMO, "demo", *args], cwd=ROOT, capture_output=True, text=True)


def test_parse_options_forms():
    r = demo("--stage", "2", "--stop_stage=3", "--train-args", "a=1 b='x y'", "--use-x", "false")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2|3|a=1 b='x y'|false"


@pytest.mark.parametrize("args,msg", [
    (["--bogus", "1"], "unknown option --bogus"),
    (["--use-x", "maybe"], "takes true or false"),
    (["positional"], "unexpected argument"),
    (["--stage"], "needs a value"),
    (["--help_message", "x"], "unknown option"),
    (["--PATH", "x"], "unknown option"),
])
def test_parse_options_rejects(args, msg):
    r = demo(*args)
    assert r.returncode == 2 and msg in r.stderr and "Usage: demo" in r.stderr


def test_parse_options_help():
    r = demo("--help")
    assert r.returncode == 0 and "Usage: demo" in r.stdout


def run_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "run.sh"), "--skip-setup", "true", *args], cwd="/", capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args,msg", [
    (["--corpus", "librispeech"], "choose synthetic or kespeech"),
    (["--size", "huge"], "choose ci, default or large"),
    (["--adapter", "nope"], "no conf/adapter/nope.yaml"),
    (["--stage", "x"], "must be integers"),
    (["--frobnicate", "1"], "unknown option --frobnicate"),
    (["--train-base", "yes"], "choose auto, true or false"),
])
def test_run_sh_rejects_bad_options(args, msg):
    r = run_sh(*args)
    assert r.returncode != 0 and msg in r.stderr


def test_run_sh_help_and_missing_base(tmp_path: Path):
    r = run_sh("--help")
    assert r.returncode == 0 and "--stop-stage" in r.stdout and "--adapter" in r.stdout
    # a stage whose input is missing fails clearly and leaves no done marker behind
    recipe = copy_recipe(tmp_path / "recipe")
    r = subprocess.run([str(recipe / "run.sh"), "--skip-setup", "true", "--stage", "3", "--stop-stage", "3",
                        "--exp-tag", "t", "--size", "ci"], cwd="/", capture_output=True, text=True, timeout=60,
                       env=recipe_env())
    assert r.returncode != 0 and "no finished base model" in r.stderr
    assert not list((recipe / "exp" / "t").glob(".done/*"))
    assert "--exp-tag" in (recipe / "exp" / "t" / "run.sh.cmd").read_text()
