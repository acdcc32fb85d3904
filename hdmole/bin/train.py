"""Stages 2-3: train one run (base model phase or adaptation) from Hydra overrides.

    hdmole-train experiment=adapt adapter=hdmole exp_dir=exp/x/hdmole train.init_from=exp/x/base
    torchrun --nproc-per-node 2 -m hdmole.bin.train ...        (DDP; gloo on CPU)

Writes <exp_dir>/{config.yaml,command.txt,git_revision.txt,versions.json,train_log.jsonl,
tensorboard/,checkpoints/{last,best}.pt,model/,model_info.json}. A rerun with the same config
resumes from checkpoints/last.pt; a changed config starts the run afresh.
"""
from __future__ import annotations

import sys

from hdmole.bin.common import save_provenance, setup_logging
from hdmole.config import compose_config
from hdmole.experiment import train_run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    setup_logging()
    train_run(compose_config(argv), lambda exp_dir: save_provenance(exp_dir, argv))


if __name__ == "__main__":
    main()
