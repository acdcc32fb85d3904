"""Multi-process training with torchrun and gloo on CPU (2 processes).

One torchrun launch runs every scenario (process start-up dominates the cost); the tests
compare its results with single-process references computed here:
- DDP with 2 x batch b == 1 process with the doubled batch (accumulation and no_sync included);
- FSDP2 likewise, and an FSDP save -> resume round trip (sharded optimiser state);
- uneven shards from a rank-sharded lhotse sampler finish (no hang) with identical replicas;
- a DDP model with a parameter that gets no gradient fails on step 1 naming the config key.
This file is also the worker: `torchrun ... tests/test_distributed.py <out_dir>`.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:You are using DynamicBucketingSampler with an eagerly read CutSet")
from torch import nn

from hdmole.batch import Batch
from hdmole.train.checkpoint import load_checkpoint
from hdmole.train.config import TrainConfig
from hdmole.train.loop import LAST, Trainer
from hdmole.train.nan_guard import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
MELS, BSZ, N_BATCHES = 4, 3, 4


@dataclass
class Out:
    loss: torch.Tensor
    aux_losses: dict


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.linear(h))


class Toy(nn.Module):
    """Frozen input layer, two blocks (FSDP units, by the Hugging Face convention), a head."""

    _no_split_modules = ["Block"]

    def __init__(self, unused: bool = False, dropout: float = 0.0):
        super().__init__()
        self.frozen = nn.Linear(MELS, 8)
        self.frozen.requires_grad_(False)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.dropout = nn.Dropout(dropout)  # the RNG stream matters (exact resume)
        self.head = nn.Linear(8, 1)
        self.spare = nn.Linear(8, 8) if unused else None  # trainable, never used

    def forward(self, batch: Batch) -> Out:
        h = self.frozen(batch.features.mean(-1))
        for block in self.blocks:
            h = block(h)
        mse = ((self.head(self.dropout(h)).squeeze(-1) - batch.accents.float()) ** 2).mean()
        aux = {"l2": 1e-3 * (self.head.weight ** 2).sum()}
        return Out(mse + aux["l2"], aux)


def toy(unused: bool = False, dropout: float = 0.0) -> Toy:
    torch.manual_seed(7)
    return Toy(unused, dropout)


def make_batch(tag: str, seed: int, bsz: int = BSZ) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(ids=[f"{tag}_{j}" for j in range(bsz)], features=torch.randn(bsz, MELS, 5, generator=g),
                 feature_lens=torch.full((bsz,), 5), accents=torch.randint(0, 9, (bsz,), generator=g))


def shard_batches(rank: int) -> list[Batch]:
    """Rank `rank`'s micro-batches of one epoch (same every epoch: order is not under test)."""
    return [make_batch(f"r{rank}b{i}", 100 * rank + i) for i in range(N_BATCHES)]


def doubled_batches() -> list[Batch]:
    """What one process sees when it takes both ranks' micro-batches at once."""
    out = []
    for a, b in zip(shard_batches(0), shard_batches(1)):
        out.append(Batch(a.ids + b.ids, torch.cat([a.features, b.features]),
                         torch.cat([a.feature_lens, b.feature_lens]), torch.cat([a.accents, b.accents])))
    return out


def train_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=4, max_epochs=10, lr=0.05, warmup_steps=0, schedule="constant", accum_steps=2,
                valid_every=0, log_every=1, device="cpu", weight_decay=0.01)
    base.update(kw)
    return TrainConfig(**base)


def final_weights(exp_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(exp_dir / "checkpoints" / LAST)["trainable"]


def bucketing_shard(rank: int, world_size: int, epoch: int) -> list[list[str]]:
    """Cut ids per batch of this rank's share of a dummy cut set (the data package's lhotse
    bucketing sampler, sharded by rank)."""
    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut

    from hdmole.data.config import DataConfig
    from hdmole.data.dataset import SAMPLER_FACTORIES

    cuts = CutSet.from_cuts([dummy_cut(i, duration=1.0 + (i % 5) * 0.5) for i in range(23)])
    cfg = DataConfig(sampler="bucketing", batch_duration=4.0, max_batch_size=4, num_buckets=2)
    sampler = SAMPLER_FACTORIES[cfg.sampler](cuts, cfg, shuffle=True, drop_last=False, world_size=world_size,
                                             rank=rank, seed=3)
    sampler.set_epoch(epoch)
    return [[c.id for c in cut_batch] for cut_batch in sampler]


# ---- the torchrun worker ---------------------------------------------------------------------
def worker(out: Path) -> None:
    from hdmole.train.distributed import cleanup_distributed, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    rank = info.rank
    results: dict = {}
    try:
        for parallel in ("ddp", "fsdp"):
            trainer = Trainer(toy(), train_cfg(parallel=parallel), out / parallel, lambda e: shard_batches(rank),
                              dist_info=info)
            st = trainer.fit()
            results[parallel] = {"step": st.step, "param_type": type(trainer.model.head.weight).__name__}
        # Resume: 2 steps, then a fresh model and trainer continue from last.pt to step 4.
        for parallel in ("ddp", "fsdp"):
            name = f"{parallel}_resume"
            Trainer(toy(), train_cfg(parallel=parallel, max_steps=2), out / name, lambda e: shard_batches(rank),
                    dist_info=info).fit()
            torch.manual_seed(99)  # other trainable weights: only the loaded checkpoint makes them match
            model = Toy()
            model.frozen.load_state_dict(toy().frozen.state_dict())  # the "pre-trained" part is the same
            st = Trainer(model, train_cfg(parallel=parallel), out / name, lambda e: shard_batches(rank),
                         dist_info=info).fit()
            results[name] = {"step": st.step}

        # Uneven shards: rank 1 runs out 2 batches early in every epoch.
        def uneven(epoch: int):
            ids = bucketing_shard(rank, info.world_size, epoch)
            if rank == 1:
                ids = ids[:-2]
            return [make_batch(f"e{epoch}_{i}", zlib.crc32(" ".join(b).encode()), bsz=len(b))
                    for i, b in enumerate(ids)]

        model = toy()
        st = Trainer(model, train_cfg(max_steps=1000, max_epochs=2, accum_steps=2), out / "uneven", uneven,
                     dist_info=info).fit()
        results["uneven"] = {"step": st.step, "stop_reason": st.stop_reason,
                             "head": model.head.weight.detach().flatten().tolist()}
        # Learning rate decayed by wall-clock time: ranks must agree on the clock.
        model = toy()
        timed = train_cfg(max_steps=10_000, max_minutes=0.02, decay_by_time=True, schedule="cosine", warmup_steps=1)
        Trainer(model, timed, out / "timed", lambda e: shard_batches(rank), dist_info=info).fit()
        results["timed"] = {"params": [p.detach().flatten().tolist() for p in model.parameters()]}
        try:
            Trainer(toy(unused=True), train_cfg(), out / "unused", lambda e: shard_batches(rank), dist_info=info).fit()
            results["unused"] = {"error": None}
        except RuntimeError as e:
            results["unused"] = {"error": str(e)}
        # A non-finite loss on rank 1 only (its 3rd micro-batch): both ranks stop, none hangs.
        for parallel in ("ddp", "fsdp"):
            bad = shard_batches(rank)
            if rank == 1:
                bad[2].features[0, 0, 0] = float("nan")
            try:
                Trainer(toy(), train_cfg(parallel=parallel), out / f"nan_{parallel}", lambda e: bad,
                        dist_info=info).fit()
                results[f"nan_{parallel}"] = None
            except NonFiniteError as e:
                results[f"nan_{parallel}"] = str(e)
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(results))
        cleanup_distributed()


# ---- the tests ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention
    (measured 100x slower backward under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve()), str(out)]
    # A hang (a rank waiting in a collective for a peer that left) fails here, not forever.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "ddp_resume", "fsdp_resume"])
def test_two_processes_equal_one_process_with_doubled_batch(torchrun_results, tmp_path, parallel):
    out, ranks = torchrun_results
    assert ranks[0][parallel]["step"] == ranks[1][parallel]["step"] == 4
    if parallel in ("ddp", "fsdp"):  # FSDP really sharded: parameters became DTensors
        assert ranks[0][parallel]["param_type"] == ("DTensor" if parallel == "fsdp" else "Parameter")
    Trainer(toy(), train_cfg(), tmp_path, lambda e: doubled_batches()).fit()
    ref, got = final_weights(tmp_path), final_weights(out / parallel)
    assert sorted(ref) == sorted(got) == ["blocks.0.linear.bias", "blocks.0.linear.weight", "blocks.1.linear.bias",
                                          "blocks.1.linear.weight", "head.bias", "head.weight"]
    moved = max(float((ref[k] - toy().state_dict()[k]).abs().max()) for k in ref)
    assert moved > 1e-2  # the comparison is not between two untrained models
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_uneven_shards_end_the_epoch_together(torchrun_results):
    _, ranks = torchrun_results
    per_rank = [len(bucketing_shard(r, 2, e)) - (2 if r == 1 else 0) for e in range(2) for r in range(2)]
    assert per_rank[0] != per_rank[1], "the scenario must be uneven"
    # each epoch lasts as long as the shortest shard; accumulation carries over epoch ends and
    # the last, incomplete accumulation still makes a step
    short = sum(min(per_rank[2 * e], per_rank[2 * e + 1]) for e in range(2))
    for r in ranks:
        assert r["uneven"]["stop_reason"] == "max_epochs"
        assert r["uneven"]["step"] == math.ceil(short / 2)
    assert ranks[0]["uneven"]["head"] == ranks[1]["uneven"]["head"]  # replicas stayed identical


def test_sampler_shards_are_disjoint_within_an_epoch():
    a, b = (set(itertools.chain.from_iterable(bucketing_shard(r, 2, 0))) for r in range(2))
    assert a and b and not a & b


def test_time_decayed_lr_keeps_replicas_identical(torchrun_results):
    _, ranks = torchrun_results
    assert ranks[0]["timed"]["params"] == ranks[1]["timed"]["params"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_non_finite_loss_on_one_rank_stops_every_rank(torchrun_results, parallel):
    _, ranks = torchrun_results
    assert "non-finite loss on another rank at step 2" in ranks[0][f"nan_{parallel}"]
    layer = "'frozen'" if parallel == "ddp" else "not searched under train.parallel=fsdp"
    assert "non-finite loss (nan) at step 2" in ranks[1][f"nan_{parallel}"] and layer in ranks[1][f"nan_{parallel}"]


def test_ddp_parameter_without_gradient_names_the_switch(torchrun_results):
    _, ranks = torchrun_results
    for r in ranks:
        assert r["unused"]["error"] and "spare.weight" in r["unused"]["error"]
        assert "train.find_unused_parameters=true" in r["unused"]["error"]


def test_every_preset_uses_all_trainable_parameters(tmp_path):
    """Why DDP runs with find_unused_parameters=False: in every adapter preset and base stage,
    each trainable parameter gets a gradient, also for utterances without accent label."""
    from hdmole.config import compose_config, to_object
    from hdmole.data.accents import ACCENTS
    from hdmole.model import LLMASR
    from hdmole.model.tiny import SAMPLE_SENTENCES, TinySizes, write_tiny_checkpoints

    dirs = write_tiny_checkpoints(tmp_path, SAMPLE_SENTENCES, TinySizes.for_tests(), seed=0)
    paths = [f"model.encoder_dir={dirs.whisper_dir}", f"model.llm_dir={dirs.llm_dir}"]
    torch.manual_seed(0)
    labelled = Batch(ids=["a", "b", "c"], features=torch.randn(3, 80, 120), feature_lens=torch.tensor([120, 90, 60]),
                     accents=torch.tensor([0, 3, 5]), texts=SAMPLE_SENTENCES[:3])
    unlabelled = Batch(labelled.ids, labelled.features, labelled.feature_lens, torch.full((3,), -1), labelled.texts)
    runs = [[f"adapter={p.stem}", "experiment=adapt"] for p in sorted((ROOT / "conf/adapter").glob("*.yaml"))
            if p.stem != "base"] + [["experiment=base_encoder"], ["experiment=base_llm"]]
    for overrides in runs:
        cfg = to_object(compose_config(overrides + paths))
        model = LLMASR.from_config(cfg.model, device="cpu")
        if cfg.adapter.method != "none":
            model.attach_adapter(cfg.adapter, num_accents=len(ACCENTS))
        model.train()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, overrides
        batches = [labelled] if cfg.adapter.global_router == "oracle" else [labelled, unlabelled]
        for batch in batches:
            for p in trainable.values():
                p.grad = None
            model(batch).loss.backward()
            unused = [n for n, p in trainable.items() if p.grad is None]
            assert not unused, (overrides, unused)


@pytest.mark.parametrize("env,args,msg", [
    ({}, ["--nnodes", "2", "--ngpu", "8"], "set MASTER_ADDR"),
    ({"MASTER_ADDR": "node1"}, ["--nnodes", "2", "--ngpu", "8"], "set NODE_RANK to this node's index, 0..1"),
    ({"MASTER_ADDR": "node1", "NODE_RANK": "2"}, ["--nnodes", "2", "--ngpu", "8"], "0..1"),
    ({"MASTER_ADDR": "node1", "NODE_RANK": "0"}, ["--nnodes", "2"], "needs --ngpu N >= 1"),
    ({}, ["--nnodes", "0"], "--nnodes 0: a positive integer"),
])
def test_run_sh_multi_node_settings_checked_before_any_stage(env, args, msg):
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NODE_RANK")}
    proc = subprocess.run([str(ROOT / "run.sh"), "--skip-setup", "true", *args], cwd="/", env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and msg in proc.stderr, proc.stderr


def test_paper_scale_smoke_tiny_mode(tmp_path):
    """bench/paper_scale_smoke.py --tiny: the GPU smoke's code path on the CPU (trains, decodes,
    reports). The paper-scale run itself needs a GPU (docs/scaling.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import paper_scale_smoke

    assert paper_scale_smoke.main(["--tiny", "--steps", "2", "--batch", "4", "--grad-ckpt",
                                   "--out", str(tmp_path / "smoke.json")]) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    train = result["rows"][0]
    assert result["meta"]["trainable_params"] > 0 and train["ms_per_step"] > 0 and train["audio_s_per_s"] > 0
    assert train["losses"][-1] < train["losses"][0]  # the steps train
    assert train["checkpoint_mib"] > 0
    decode = {r.get("backend", r["what"]): r for r in result["rows"][1:]}
    assert decode["transcribe"]["utterances"] == 4 and decode["static"]["tokens_per_s"] > 0


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
