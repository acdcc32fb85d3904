"""The shipped tiny base (hdmole.train.pretrained) and the wall-clock lr decay it trains with."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hdmole.batch import Batch
from hdmole.experiment import build_model
from hdmole.config import compose_config, save_resolved, to_object
from hdmole.model.tiny import SAMPLE_SENTENCES, TinySizes, write_tiny_checkpoints
from hdmole.train import pretrained as pt
from hdmole.train.export import exported_state, save_export
from hdmole.train.schedule import lr_multiplier

CORPUS = "hdmole-synth-1 test seed=0 plan=0123456789abcdef"


def test_decay_follows_the_budget_that_runs_out_first():
    # Half the wall budget used at 10% of the steps: the cosine is at its middle.
    assert lr_multiplier(20, 10, 110, "cosine", 0.1, time_progress=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    # Steps ahead of time: the step share decides, as without a wall budget.
    assert lr_multiplier(60, 10, 110, "cosine", 0.1, time_progress=0.2) == lr_multiplier(60, 10, 110, "cosine", 0.1)
    assert lr_multiplier(20, 10, 110, "cosine", 0.1, time_progress=1.5) == pytest.approx(0.1)
    assert lr_multiplier(3, 10, 110, "cosine", 0.1, time_progress=0.9) == pytest.approx(0.4)  # warm-up is step-based


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished base run (random weights, every part changed from the tiny checkpoints)."""
    root = tmp_path_factory.mktemp("base")
    dirs = write_tiny_checkpoints(root / "tiny", SAMPLE_SENTENCES, TinySizes.for_tests(), seed=0)
    common = [f"model.encoder_dir={dirs.whisper_dir}", f"model.llm_dir={dirs.llm_dir}", "model.projector_hidden=32"]
    run = root / "run"
    dcfg = compose_config([*common, "experiment=base_llm", f"exp_dir={run}", "model.freeze_encoder=false"])
    save_resolved(dcfg, run)
    model, _ = build_model(to_object(dcfg), "cpu")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_export(run, exported_state(model, set()), {"step": 7})
    return run, common


def batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(ids=["a", "b"], features=torch.randn(2, 80, 120, generator=g), feature_lens=torch.tensor([120, 90]),
                 accents=torch.tensor([0, 3]), texts=["今天天气很好", "请把门关上"])


def test_export_then_install_rebuilds_the_base(base_run, tmp_path: Path):
    run, common = base_run
    out = pt.export_base(run, tmp_path / "pretrained", CORPUS, {"command": "test"})
    assert pt.corpus_version(out) == CORPUS
    for f in ("whisper/model.safetensors", "qwen/model.safetensors", "qwen/tokenizer.json", "projector.safetensors"):
        assert (out / f).is_file(), f
    assert all(p.stat().st_size <= pt.MAX_FILE_BYTES for p in out.rglob("*") if p.is_file())
    with pytest.raises(ValueError, match="retrain"):
        pt.install_base(out, tmp_path / "x", CORPUS.replace("seed=0", "seed=1"), common)

    base_dir = pt.install_base(out, tmp_path / "base_model", CORPUS, common)
    # What stage 3 builds (run.sh: common overrides + the base's own model keys) with adapter base.
    cfg = to_object(compose_config([*common, *pt.base_model_overrides(base_dir), "experiment=adapt", "adapter=base",
                                    f"train.init_from={base_dir}"]))
    shipped, _ = build_model(cfg, "cpu")
    original, _ = build_model(to_object(compose_config([*common, "experiment=adapt", "adapter=base",
                                                        f"train.init_from={run}"])), "cpu")
    shipped.eval(), original.eval()
    with torch.no_grad():
        a, b = shipped(batch()), original(batch())
    assert float(a.loss) == pytest.approx(float(b.loss), rel=2e-3)  # float16 storage
    # Every tensor really came from the export (not the random tiny checkpoints).
    ref = dict(original.named_parameters())
    for name, p in shipped.named_parameters():
        torch.testing.assert_close(p, ref[name], atol=2e-3, rtol=2e-3, msg=name)
