"""Training survives faults: SIGKILL at any moment, half-written or corrupt checkpoints, full or
unwritable disks.

A killed run is a real process killed with SIGKILL (no exception handler, no `finally`):
this file is also the worker, `python tests/test_fault_tolerance.py <exp_dir> <fault> <n>`.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdmole.train.checkpoint import atomic_torch_save, load_checkpoint
from hdmole.train.logger import read_log
from hdmole.train.loop import LAST, Trainer
from test_distributed import make_batch, one_thread, toy, train_cfg  # noqa: F401  (autouse fixture)

N_BATCHES = 5  # micro-batches per epoch: odd, so accumulation windows cross epoch ends


def epoch_batches(epoch: int):
    """Shuffled by epoch only (as the samplers are), so a resumed run sees the same order."""
    data = [make_batch(f"b{i}", i) for i in range(N_BATCHES)]
    order = torch.randperm(N_BATCHES, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
    return [data[i] for i in order]


def run_cfg():
    # dropout + deterministic: the resumed run must restore the RNG stream exactly
    return train_cfg(max_steps=10, accum_steps=2, save_every=2, schedule="cosine", warmup_steps=2,
                     deterministic=True)


def train(exp_dir: Path, batches=epoch_batches) -> Trainer:
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        trainer = Trainer(toy(dropout=0.3), run_cfg(), exp_dir, batches)
        trainer.fit()
    finally:
        torch.use_deterministic_algorithms(was)
    return trainer


# ---- the worker ----------------------------------------------------------------------------------
def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def worker(exp_dir: Path, fault: str, n: int) -> None:
    """fault=batch: SIGKILL when micro-batch n is requested (inside an accumulation window);
    fault=save: SIGKILL in the middle of writing the n-th checkpoint; fault=none: run to the end."""
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    torch.manual_seed(1000 + os.getpid())  # a restarted process starts from unrelated RNG state
    batches = epoch_batches
    if fault == "batch":
        count = [0]

        def batches(epoch: int):  # noqa: F811
            for b in epoch_batches(epoch):
                count[0] += 1
                if count[0] == n:
                    kill_self()
                yield b
    elif fault == "save":
        real_save, saves = torch.save, [0]

        def dying_save(obj, f, *args, **kwargs):
            saves[0] += 1
            if saves[0] < n:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the bytes reach the disk
            f.flush()
            os.fsync(f.fileno())
            kill_self()

        torch.save = dying_save
    train(exp_dir, batches)


def run_worker(exp_dir: Path, fault: str, n: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), str(exp_dir), fault, str(n)],
                          env=env, capture_output=True, text=True, timeout=120)


# ---- tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run (in its own process, as the others)."""
    out = tmp_path_factory.mktemp("ref")
    proc = run_worker(out, "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(out / "checkpoints" / LAST)["trainable"]


@pytest.mark.parametrize("fault,n,step_on_disk", [
    ("batch", 12, 4),  # micro-batch 12 = 2nd half of step 6: last checkpoint is step 4's
    ("save", 3, 4),  # killed while writing step 6's checkpoint: step 4's survives
])
def test_sigkill_then_resume_gives_uninterrupted_weights(reference, tmp_path, fault, n, step_on_disk):
    killed = run_worker(tmp_path, fault, n)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt_dir = tmp_path / "checkpoints"
    assert load_checkpoint(ckpt_dir / LAST)["state"]["step"] == step_on_disk
    temporaries = list(ckpt_dir.glob(".*.tmp-*"))
    assert len(temporaries) == (1 if fault == "save" else 0)  # the half-written file, not under the real name

    resumed = run_worker(tmp_path, "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt_dir / LAST} at step {step_on_disk}" in resumed.stderr
    assert not list(ckpt_dir.glob(".*.tmp-*"))  # the stale temporary was removed
    final = load_checkpoint(ckpt_dir / LAST)
    assert final["state"]["step"] == 10
    assert sorted(final["trainable"]) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(final["trainable"][name], value), name
    # every step is logged once, also across the kill
    assert [r["step"] for r in read_log(tmp_path, "train")] == list(range(1, 11))


class Crash(Exception):
    pass


def test_rng_restore_is_what_makes_resume_exact(reference, tmp_path):
    """The comparison above can fail: the same resume with another RNG stream (dropout
    draws) ends elsewhere."""
    count = [0]

    def crashing(epoch: int):
        for b in epoch_batches(epoch):
            count[0] += 1
            if count[0] == 12:
                raise Crash
            yield b

    with pytest.raises(Crash):
        train(tmp_path / "a", crashing)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    last_b = tmp_path / "b/checkpoints" / LAST
    ckpt = load_checkpoint(last_b)
    ckpt["rng"]["torch"] = torch.Generator().manual_seed(5).get_state()
    atomic_torch_save(ckpt, last_b)  # never in place: the loaded checkpoint maps the file
    finals = {}
    for run in ("a", "b"):
        train(tmp_path / run)
        finals[run] = load_checkpoint(tmp_path / run / "checkpoints" / LAST)["trainable"]
    assert all(torch.equal(finals["a"][k], v) for k, v in reference.items())
    assert any(not torch.equal(finals["b"][k], v) for k, v in reference.items())


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_last_checkpoint_is_never_loaded(tmp_path, content):
    train(tmp_path)
    last = tmp_path / "checkpoints" / LAST
    data = last.read_bytes()
    last.write_bytes(os.urandom(4096) if content == "garbage" else data[: len(data) // 2])
    batches_asked = []
    trainer = Trainer(toy(dropout=0.3), run_cfg(), tmp_path, lambda e: batches_asked.append(e) or [])
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*last.pt"):
        trainer.fit()
    assert not batches_asked


@pytest.mark.parametrize("payload", ["reduce", "function"])
def test_checkpoint_carrying_code_is_refused(tmp_path, payload):
    """Whoever can write exp_dir must not run code as whoever resumes: pickled callables are refused."""
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    train(tmp_path)
    last = tmp_path / "checkpoints" / LAST
    ckpt = load_checkpoint(last)
    ckpt["state"]["stop_reason"] = RunsCode() if payload == "reduce" else os.getcwd
    atomic_torch_save(ckpt, last)
    batches_asked = []
    trainer = Trainer(toy(dropout=0.3), run_cfg(), tmp_path, lambda e: batches_asked.append(e) or [])
    with pytest.raises(RuntimeError, match=rf"refusing checkpoint {last}: it holds posix\.(system|getcwd), not only "
                                           r"tensors and plain values"):
        trainer.fit()
    assert not marker.exists() and not batches_asked


@pytest.mark.parametrize("written_by", ["now", "before plain rng state"])
def test_rng_state_loads_as_data_and_restores_exactly(tmp_path, written_by):
    import random

    import numpy as np

    from hdmole.train.checkpoint import CHECKPOINT_FORMAT, rng_state, set_rng_state

    np.random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    rng = rng_state() if written_by == "now" else {**rng_state(), "numpy": np.random.get_state()}  # ndarray key
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "rng": rng}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(2).tolist())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(2).tolist()) == expected
    if written_by == "now":  # nothing beyond what weights_only allows by default
        assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []


def test_stale_temporary_next_to_valid_checkpoint_is_ignored_and_removed(tmp_path):
    train(tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    good = load_checkpoint(ckpt_dir / LAST)
    stale = ckpt_dir / ".last.pt.tmp-99999"
    stale.write_bytes(b"\x80\x02half a pickle")
    cfg = run_cfg()
    cfg.max_steps = 11  # one more step: the run resumes from last.pt
    Trainer(toy(dropout=0.3), cfg, tmp_path, epoch_batches).fit()
    assert not stale.exists()
    assert load_checkpoint(ckpt_dir / LAST)["state"]["step"] == good["state"]["step"] + 1


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import hdmole.train.checkpoint as checkpoint

    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, (10 * 2**20) // st.f_frsize  # 10 MiB left

    monkeypatch.setattr(checkpoint.os, "statvfs", lambda p: Full(real(p)))
    asked = []
    with pytest.raises(RuntimeError, match=r"only 10 MiB free, need at least \d+ MiB"):
        Trainer(toy(), run_cfg(), tmp_path, lambda e: asked.append(e) or []).fit()
    assert not asked and not (tmp_path / "checkpoints" / LAST).exists()


def test_unwritable_experiment_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    asked = []
    with pytest.raises(RuntimeError, match=f"experiment directory {blocker / 'exp'} is not writable"):
        Trainer(toy(), run_cfg(), blocker / "exp", lambda e: asked.append(e) or []).fit()
    assert not asked


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, saves = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train(tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "checkpoints"
    assert load_checkpoint(ckpt_dir / LAST)["state"]["step"] == 2
    assert [p.name for p in ckpt_dir.iterdir()] == [LAST]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
