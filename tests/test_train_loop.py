"""Training loop on a toy model: exact resume, accumulation, early stopping, NaN guard,
atomic checkpoints. The loop only sees `model(batch).loss`, so a toy model exercises it fully."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from hdmole.batch import Batch
from hdmole.train.checkpoint import atomic_torch_save, check_writable, load_checkpoint
from hdmole.train.config import TrainConfig
from hdmole.train.logger import read_log
from hdmole.train.loop import BEST, LAST, Trainer
from hdmole.train.nan_guard import NonFiniteError
from hdmole.train.schedule import lr_multiplier


@dataclass
class Out:
    loss: torch.Tensor
    asr_loss: torch.Tensor
    aux_losses: dict


class Toy(nn.Module):
    def __init__(self, mels: int = 4):
        super().__init__()
        self.frozen = nn.Linear(mels, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))

    def forward(self, batch: Batch) -> Out:
        x = batch.features.mean(-1)
        h = self.frozen(x)
        y = self.head(h).squeeze(-1)
        mse = ((y - batch.accents.float()) ** 2).mean()
        aux = {"l2": 1e-3 * (self.head[0].weight ** 2).sum()}
        return Out(mse + aux["l2"], mse, aux)


def make_batches(n_batches: int = 5, bsz: int = 3, mels: int = 4):
    g = torch.Generator().manual_seed(0)
    data = [Batch(ids=[f"u{i}_{j}" for j in range(bsz)], features=torch.randn(bsz, mels, 6, generator=g),
                  feature_lens=torch.full((bsz,), 6), accents=torch.randint(0, 9, (bsz,), generator=g))
            for i in range(n_batches)]

    def epoch_batches(epoch: int):
        order = torch.randperm(n_batches, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
        return [data[i] for i in order]

    return epoch_batches


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=12, lr=0.05, warmup_steps=2, accum_steps=2, valid_every=4, log_every=1,
                device="cpu", early_stop_patience=0)
    base.update(kw)
    return TrainConfig(**base)


def fresh_model() -> Toy:
    torch.manual_seed(7)
    return Toy()


class Killed(Exception):
    pass


def test_resume_gives_same_weights_as_uninterrupted(tmp_path: Path):
    batches = make_batches()
    ref = fresh_model()
    Trainer(ref, cfg(), tmp_path / "ref", batches, validate=lambda m: {"cer": 1.0}).fit()

    calls = {"n": 0}

    def dying(epoch: int):
        for b in batches(epoch):
            calls["n"] += 1
            if calls["n"] == 13:  # micro-batch 13 = inside step 7, after the step-4 checkpoint
                raise Killed
            yield b

    torch.manual_seed(999)  # the resumed process starts from unrelated RNG state
    with pytest.raises(Killed):
        Trainer(fresh_model(), cfg(), tmp_path / "run", dying, validate=lambda m: {"cer": 1.0}).fit()
    assert load_checkpoint(tmp_path / "run/checkpoints" / LAST)["state"]["step"] == 4
    torch.manual_seed(12345)
    model = fresh_model()
    state = Trainer(model, cfg(), tmp_path / "run", batches, validate=lambda m: {"cer": 1.0}).fit()
    assert state.step == 12 and state.stop_reason == "max_steps"
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    # the log of the resumed run has each step once
    steps = [r["step"] for r in read_log(tmp_path / "run", "train")]
    assert steps == list(range(1, 13))


def test_training_reduces_loss_and_accumulation_matches_big_batch(tmp_path: Path):
    batches = make_batches(n_batches=4, bsz=2)
    m = fresh_model()
    m.head[2].p = 0.0
    Trainer(m, cfg(max_steps=40, accum_steps=1, valid_every=0), tmp_path / "a", batches).fit()
    log = read_log(tmp_path / "a", "train")
    assert log[-1]["asr_loss"] < 0.5 * log[0]["asr_loss"]
    assert "aux/l2" in log[0] and "grad_norm" in log[0]

    # accumulation of 2 micro-batches == one batch of both (mean losses, equal sizes)
    def one(model: Toy, micro: bool, path: Path):
        b = make_batches(n_batches=2, bsz=2)
        if micro:
            feed = b
        else:
            def feed(epoch):
                x, y = b(epoch)
                return [Batch(x.ids + y.ids, torch.cat([x.features, y.features]),
                              torch.cat([x.feature_lens, y.feature_lens]), torch.cat([x.accents, y.accents]))]
        Trainer(model, cfg(max_steps=1, accum_steps=2 if micro else 1, valid_every=0, warmup_steps=0,
                           weight_decay=0.0), path, feed).fit()

    m1, m2 = fresh_model(), fresh_model()
    m1.head[2].p = m2.head[2].p = 0.0
    one(m1, True, tmp_path / "m1")
    one(m2, False, tmp_path / "m2")
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_early_stopping_keeps_best(tmp_path: Path):
    metrics = iter([0.9, 0.5, 0.6, 0.7, 0.8, 0.1])
    seen = {}

    def validate(model):
        v = next(metrics)
        seen[v] = model.head[0].weight.detach().clone()
        return {"cer": v, "loss": 0.0}

    m = fresh_model()
    tr = Trainer(m, cfg(max_steps=100, valid_every=2, early_stop_patience=2, valid_at_start=True),
                 tmp_path, make_batches(), validate=validate)
    st = tr.fit()
    assert st.stop_reason == "early_stop"
    assert st.best_metric == 0.5 and st.best_step == 2 and st.step == 6
    tr.load_best()
    assert torch.equal(m.head[0].weight, seen[0.5])
    # a finished run is not trained again
    st2 = Trainer(fresh_model(), cfg(max_steps=100, valid_every=2, early_stop_patience=2), tmp_path,
                  make_batches(), validate=validate).fit()
    assert st2.step == 6


def test_nan_guard_names_step_and_layer(tmp_path: Path):
    m = fresh_model()
    with torch.no_grad():
        m.frozen.weight[0, 0] = float("nan")  # a broken weight: its layer's output is the first NaN
    with pytest.raises(NonFiniteError, match=r"loss.*step 1.*layer 'frozen'"):
        Trainer(m, cfg(), tmp_path / "a", make_batches()).fit()
    # inf saturates tanh (finite loss) but poisons the gradient of the next layer's weight
    m = fresh_model()
    with torch.no_grad():
        m.frozen.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"gradient at step 1.*'head.0.weight'"):
        Trainer(m, cfg(), tmp_path / "b", make_batches()).fit()


class PoisonedGradient(Toy):
    """Finite loss, NaN gradient for every head weight on the batch holding utterance `bad`."""

    def __init__(self, bad: str = "u2_0"):
        super().__init__()
        self.bad, self.poisoned = bad, 0

    def forward(self, batch: Batch) -> Out:
        out = super().forward(batch)
        if self.bad in batch.ids and out.loss.requires_grad:
            self.poisoned += 1
            out.loss.register_hook(lambda g: g * float("nan"))
        return out


def test_nonfinite_gradient_steps_are_skipped_counted_and_bounded(tmp_path: Path):
    with pytest.raises(NonFiniteError, match=r"gradient at step \d+.*u2_0.*max_skipped_steps=0"):
        Trainer(PoisonedGradient(), cfg(), tmp_path / "strict", make_batches()).fit()
    torch.manual_seed(7)
    m = PoisonedGradient()
    st = Trainer(m, cfg(max_skipped_steps=100), tmp_path / "skip", make_batches()).fit()
    assert m.poisoned > 1 and st.skipped_steps == m.poisoned  # every poisoned step skipped, none other
    assert st.step == 12 and st.stop_reason == "max_steps"  # skipped updates are not counted as steps
    assert all(torch.isfinite(p).all() for p in m.parameters() if p.requires_grad)
    assert load_checkpoint(tmp_path / "skip" / "checkpoints" / LAST)["state"]["skipped_steps"] == st.skipped_steps
    assert [r for r in read_log(tmp_path / "skip") if r["kind"] == "valid"][-1]["skipped_steps"] == st.skipped_steps
    torch.manual_seed(7)
    with pytest.raises(NonFiniteError, match=r"skipped 1 before, train.max_skipped_steps=1"):
        Trainer(PoisonedGradient(), cfg(max_skipped_steps=1), tmp_path / "bounded", make_batches()).fit()


def test_atomic_save_never_leaves_partial_checkpoint(tmp_path: Path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"format": "hdmole-train-v1", "v": 1}, path)
    real_save = torch.save

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"format": "hdmole-train-v1", "v": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_unwritable_exp_dir_fails_before_training(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match="not writable"):
        check_writable(blocker / "exp")


def test_schedule_warmup_and_decay():
    assert lr_multiplier(0, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 110, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(60, 10, 110, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, 10, 110, "linear", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 0, 100, "constant", 0.1) == 1.0
    with pytest.raises(ValueError, match="unknown"):
        lr_multiplier(0, 1, 2, "cosne", 0.1)


def test_autocast_follows_the_models_own_dtype():
    """One key for the compute dtype (model.dtype): the trainer autocasts to what the model
    autocasts itself to, and not at all for a model without one."""
    from hdmole.train.loop import model_autocast_dtype

    plain = Toy()
    assert model_autocast_dtype(plain) is None
    own = Toy()
    own.compute_dtype = torch.float32  # LLMASR's model.dtype: its forward autocasts to this
    assert model_autocast_dtype(own) is None
    own.compute_dtype = torch.bfloat16
    assert model_autocast_dtype(own) == torch.bfloat16  # FSDP gathers in bf16


def test_valid_at_start_also_without_periodic_validation(tmp_path: Path):
    steps = []

    def validate(model):
        steps.append(len(steps))
        return {"cer": 1.0 - 0.1 * len(steps), "loss": 0.0}

    st = Trainer(fresh_model(), cfg(max_steps=4, valid_every=0, valid_at_start=True), tmp_path,
                 make_batches(), validate=validate).fit()
    rows = [r["step"] for r in read_log(tmp_path) if r["kind"] == "valid"]
    assert rows == [0, 4] and st.best_step == 4  # at the start and at the end, nothing between


def test_lr_scales_make_parameter_groups(tmp_path: Path):
    model = fresh_model()
    scales = {"head.3.weight": 10.0, "head.3.bias": 10.0}
    trainer = Trainer(model, cfg(max_steps=3, weight_decay=0.1), tmp_path, make_batches(), lr_scales=scales)
    groups = trainer.optimizer.param_groups
    assert groups[0]["initial_lr"] == pytest.approx(0.05)  # the logged lr: multiplier 1 first
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["head.3.weight"])]["initial_lr"] == pytest.approx(0.5)
    assert by_param[id(named["head.3.weight"])]["weight_decay"] == 0.1
    assert by_param[id(named["head.3.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["head.0.weight"])]["initial_lr"] == pytest.approx(0.05)
    trainer.fit()  # the schedule scales every group's own peak lr
    assert by_param[id(named["head.3.weight"])]["lr"] == pytest.approx(10 * groups[0]["lr"])
    with pytest.raises(ValueError, match="names no trainable parameter.*frozen.weight"):
        Trainer(fresh_model(), cfg(), tmp_path / "x", make_batches(), lr_scales={"frozen.weight": 2.0})
