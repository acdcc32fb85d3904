"""Grids and seeds as Hydra multiruns: each job is one experiment config, trained (and with
`run`, decoded and scored) in its own directory.

    python -m hdmole.bin.sweep train -m adapter=lora,hdmole train.lr=1e-3,3e-3 train.seed=0 \\
        hydra.sweep.dir=exp/x/sweep <the run's data/model overrides>
    python -m hdmole.bin.sweep run -m adapter=hdmole train.lr=3e-3 train.seed=0,1,2 ...

`train`: stage 3 only (a grid point: its dev CER is in model_info.json); `run`: stages 3-5
(train, decode every test set, score). A job's exp_dir is its Hydra output directory,
<hydra.sweep.dir>/<adapter>/lr<lr>_seed<seed> (conf/config.yaml), so the same point of two
sweeps is the same directory: a finished run with the same config is not touched (an
unfinished one resumes from its checkpoint), a decode is redone only when the model changed. Jobs run one after another by default; `hydra/launcher=joblib
hydra.launcher.n_jobs=2` runs them in parallel processes (hydra-joblib-launcher), and on a
SLURM cluster `hydra/launcher=submitit_slurm` (pip install hydra-submitit-launcher) submits
each job with the same command (docs/recipe.md).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from hdmole.bin.common import save_provenance, setup_logging
from hdmole.config import check_schema, default_config_dir, register_schema, to_object
from hdmole.experiment import decode_run, same_config, train_run
from hdmole.score import write_reports

log = logging.getLogger("hdmole.sweep")
MODES = ("train", "run")
DECODED = "decode/.model_done"  # the model/done it decoded: a rerun skips unchanged decodes


def job(cfg: DictConfig, mode: str) -> None:
    setup_logging()
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the job's own directory (relative: portable configs)
        with open_dict(cfg):
            cfg.exp_dir = os.path.relpath(hydra_cfg.runtime.output_dir)
    check_schema(cfg)
    exp_dir = Path(cfg.exp_dir)
    argv = [f"{mode}", *hydra_cfg.overrides.task]
    if (exp_dir / "model" / "done").is_file() and same_config(cfg, exp_dir):
        log.info("%s: training already finished with this config", exp_dir)
    else:
        train_run(cfg, lambda d: save_provenance(d, argv))
    if mode == "train":
        return
    done = (exp_dir / "model" / "done").read_text(encoding="utf-8")
    marker = exp_dir / DECODED
    if not (marker.is_file() and marker.read_text(encoding="utf-8") == done):
        run_cfg = to_object(cfg)
        if run_cfg.train.num_threads > 0:
            torch.set_num_threads(run_cfg.train.num_threads)
        decode_run(run_cfg, exp_dir)
        marker.write_text(done, encoding="utf-8")
    score = write_reports(exp_dir, hydra_cfg.runtime.choices.get("adapter"))
    log.info("%s: mean accent CER %.2f%%, source CER %.2f%%", exp_dir, score.mean_accent_cer, score.source_cer)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        sys.exit(__doc__)
    mode = sys.argv.pop(1)
    register_schema()
    app = hydra.main(config_path=str(default_config_dir().resolve()), config_name="config",
                     version_base="1.3")(lambda cfg: job(cfg, mode))
    app()


if __name__ == "__main__":
    main()
