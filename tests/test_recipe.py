"""End to end: ./run.sh stages 0-5 on the `ci` synthetic corpus with the tiny model on CPU,
then a rerun (a no-op), then single stages with changed settings."""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hdmole.data.accents import ACCENTS
from hdmole.score import read_keyed

from conftest import copy_recipe, recipe_env

TAG = "pytest_recipe"
# A few steps per phase: this checks the plumbing, not the accuracy (see README for real runs).
FAST = ["--size", "ci", "--exp-tag", TAG, "--skip-setup", "true",
        "--base-args", "train.max_steps=3 train.valid_every=3 train.max_minutes=0 train.valid_max_batches=1",
        "--train-args", "train.max_steps=3 train.valid_every=2 train.max_minutes=0 train.valid_max_batches=1"]


@dataclass
class Recipe:
    root: Path  # a copy of the recipe (conftest.copy_recipe): data/ and exp/ are written there
    exp: Path
    seconds: float = 0.0

    def run(self, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.root / "run.sh"), *FAST, *args], cwd=self.root, capture_output=True, text=True,
                           timeout=900, env=recipe_env())
        assert r.returncode == 0, f"run.sh {' '.join(args)} failed:\n{r.stderr[-4000:]}"
        return r


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = copy_recipe(tmp_path_factory.mktemp("recipe"))
    recipe = Recipe(root, root / "exp" / TAG)
    start = time.time()
    recipe.run()
    recipe.seconds = time.time() - start
    return recipe


@pytest.mark.slow
def test_stages_0_to_5(recipe):
    adapt = recipe.exp / "hdmole"
    results = (adapt / "RESULTS.md").read_text()
    for accent in ACCENTS:
        assert f"| kespeech_test | {accent} |" in results
    assert "| aishell_test | all |" in results
    for name in ("kespeech_test", "aishell_test"):
        d = adapt / "decode" / name
        assert set(read_keyed(d / "hyp")) == set(read_keyed(d / "ref")) == set(read_keyed(d / "utt2accent"))
    assert (adapt / "plots" / "cer_per_accent.png").exists()
    assert (adapt / "plots" / "active_experts_per_layer.png").exists()
    for run_dir in (recipe.exp / "base_model_encoder", recipe.exp / "base_model", adapt):  # provenance of every run
        for name in ("config.yaml", "command.txt", "git_revision.txt", "versions.json", "model/done"):
            assert (run_dir / name).exists(), run_dir / name
    assert "--exp-tag" in (recipe.exp / "run.sh.cmd").read_text()
    assert f"init_from: exp/{TAG}/base_model" in (adapt / "config.yaml").read_text()
    print(f"ci recipe stages 0-5: {recipe.seconds:.0f} s")


@pytest.mark.slow
def test_rerun_is_noop_and_single_stages(recipe):
    results = recipe.exp / "hdmole" / "RESULTS.md"
    before = results.stat().st_mtime_ns
    r = recipe.run()
    assert r.stderr.count("up to date, skipped") >= 8, r.stderr[-3000:]
    assert "running:" not in r.stderr
    assert results.stat().st_mtime_ns == before
    # a changed decoding setting redoes stage 4 (and the scoring that depends on it) only
    r = recipe.run("--stage", "4", "--stop-stage", "5", "--decode-args", "decode.max_new_tokens=4")
    assert "running: python -m hdmole.bin.decode" in r.stderr and "hdmole.bin.train" not in r.stderr
    assert results.stat().st_mtime_ns != before
    # the base-line preset decodes the base model without training anything
    r = recipe.run("--stage", "3", "--stop-stage", "5", "--adapter", "base")
    info = (recipe.exp / "base" / "model" / "info.json")
    assert info.exists() and "| trainable parameters | 0 |" in (recipe.exp / "base" / "RESULTS.md").read_text()


@pytest.mark.slow
def test_decode_checkpoint_best_or_last(recipe, monkeypatch):
    from safetensors.torch import load_file

    from hdmole.experiment import load_decoding_weights
    from hdmole.experiment import build_model
    from hdmole.config import load_resolved, to_object
    from hdmole.train.checkpoint import load_checkpoint

    monkeypatch.chdir(recipe.root)  # the run's config names its data and base relative to the recipe
    run_dir = recipe.exp / "hdmole"
    cfg = to_object(load_resolved(run_dir, []))
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainable"]
    export = load_file(str(run_dir / "model" / "weights.safetensors"))
    for which, want in (("best", export), ("last", last)):
        model, _ = build_model(cfg)
        load_decoding_weights(model, run_dir, which)
        params = dict(model.named_parameters())
        for name in last:  # every trainable parameter comes from the chosen source
            assert torch.equal(params[name].detach(), want[name].to(params[name].dtype)), (which, name)
    with pytest.raises(Exception, match="decode.checkpoint='newest'"):
        to_object(load_resolved(run_dir, ["decode.checkpoint=newest"]))


@pytest.mark.slow
def test_paper_comparison_sweep_chooses_on_dev_and_reports(recipe, tmp_path):
    """The suite's plumbing on the ci corpus: an lr grid (Hydra multirun), the dev choice, the
    chosen lr with two seeds decoded and scored, the report with CIs and claims; a rerun
    decodes nothing again."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# kept prose\n", encoding="utf-8")
    args = [str(recipe.root / "recipes" / "paper_comparison.sh"), *FAST[:FAST.index("--train-args")],
            "--presets", "lora hdmole", "--lrs", "1e-3,2e-2", "--seeds", "0,1", "--launcher", "basic",
            "--train-args", "train.max_steps=2 train.valid_every=2", "--out", str(out)]
    r = subprocess.run(args, cwd=recipe.root, capture_output=True, text=True, timeout=900, env=recipe_env())
    assert r.returncode == 0, r.stderr[-4000:]
    sweep = recipe.exp / "sweep"
    for preset in ("lora", "hdmole"):
        dev = {d.name[len("lr"):-len("_seed0")]: json.loads((d / "model_info.json").read_text())["best_metric"]
               for d in (sweep / preset).glob("lr*_seed0")}
        # two grid points: the best is always on an edge, so one more lr beyond it was trained
        assert len(dev) == 3 and {"0.001", "0.02"} < set(dev), dev
        chosen = min(dev, key=lambda lr: (dev[lr], float(lr)))
        for seed in (0, 1):
            assert (sweep / preset / f"lr{chosen}_seed{seed}" / "decode" / "kespeech_test" / "hyp").exists()
        for other in set(dev) - {chosen}:
            assert not (sweep / preset / f"lr{other}_seed0" / "decode").exists()  # grid points: dev only
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# kept prose\n")
    for needle in ("| hdmole |", "| lora |", "| base |", "paired bootstrap", "hdmole beats lora", "tau is learned"):
        assert needle in text, needle
    assert (tmp_path / "docs" / "results" / "comparison_cer.png").exists()
    marker = sweep / "hdmole" / f"lr{chosen}_seed1" / "decode" / ".model_done"
    before = marker.stat().st_mtime_ns
    r = subprocess.run(args, cwd=recipe.root, capture_output=True, text=True, timeout=900, env=recipe_env())
    assert r.returncode == 0, r.stderr[-4000:]
    assert marker.stat().st_mtime_ns == before and "training already finished" in r.stderr
    assert out.read_text(encoding="utf-8").count("paper_results.py report: begin") == 1


@pytest.mark.slow
def test_encoder_cache_fill_leaves_the_random_state_alone(recipe, tmp_path, monkeypatch):
    """A run that computes the encoder-output cache and one that loads it must draw the same
    dropout masks: filling iterates DataLoaders, which draw seeds from the global generator."""
    from dataclasses import replace

    from hdmole.config import load_resolved, to_object
    from hdmole.experiment import TARGET, attach_encoder_cache, build_model

    monkeypatch.chdir(recipe.root)
    cfg = to_object(load_resolved(recipe.exp / "hdmole", []))
    cfg.data = replace(cfg.data, encoder_cache_dir=str(tmp_path / "encoder_out"))
    cut_sets = [cfg.data.feature_cuts_path(TARGET, "train"), cfg.data.feature_cuts_path(TARGET, "dev")]
    for fills in (True, False):  # computed, then loaded from disk
        model, _ = build_model(cfg, "cpu")
        torch.manual_seed(5)
        attach_encoder_cache(cfg, model, cut_sets)
        after = torch.rand(3)
        torch.manual_seed(5)
        assert torch.equal(after, torch.rand(3)), f"fill={fills}"
        assert model.encoder_cache.outputs and (tmp_path / "encoder_out").is_dir()
