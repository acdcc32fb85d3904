"""Stage 4: decode every test set with a finished training run, reusing its saved config.

    hdmole-decode exp_dir=exp/x/hdmole [decode.num_beams=4 decode.test_sets=[kespeech_test]]

Only decode.* may be overridden: the model, adapter and data come from <exp_dir>/config.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hdmole.bin.common import save_provenance, setup_logging
from hdmole.config import load_resolved, to_object
from hdmole.experiment import decode_run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    exp = [a for a in argv if a.startswith("exp_dir=")]
    if not exp or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    setup_logging()
    exp_dir = Path(exp[-1].partition("=")[2])
    overrides = [a for a in argv if not a.startswith("exp_dir=")]
    cfg = to_object(load_resolved(exp_dir, overrides))
    save_provenance(exp_dir / "decode", argv)
    decode_run(cfg, exp_dir)


if __name__ == "__main__":
    main()
