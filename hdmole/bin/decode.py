"""Stage 4: decode every test set with a finished training run, reusing its saved config.

    hdmole-decode exp_dir=exp/x/hdmole [decode.num_beams=4 decode.test_sets=[kespeech_test]]

Only decode.* may be overridden: the model, adapter and data come from <exp_dir>/config.yaml.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hdmole.bin.common import save_provenance, setup_logging
from hdmole.bin.train import build_model, make_loader, routing_handle
from hdmole.config import load_resolved, to_object
from hdmole.data.accents import ACCENTS
from hdmole.decode import generation_kwargs, transcribe_batches, write_set
from hdmole.train.checkpoint import load_checkpoint, load_trainable_state
from hdmole.train.distributed import DistInfo
from hdmole.train.export import load_export
from hdmole.train.loop import LAST

log = logging.getLogger("hdmole.decode")
DEFAULT_TEST_SETS = ("kespeech_test", "aishell_test")


def load_decoding_weights(model, exp_dir: Path, checkpoint: str) -> None:
    """The run's own export (its best checkpoint, over init_from's weights); for "last", the
    trainable weights of checkpoints/last.pt over that."""
    load_export(model, exp_dir)
    if checkpoint == "last":
        path = exp_dir / "checkpoints" / LAST
        if not path.exists():
            raise FileNotFoundError(f"decode.checkpoint=last: {path} does not exist")
        load_trainable_state(model, load_checkpoint(path)["trainable"], str(path))


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
    device = None if cfg.decode.device == "auto" else cfg.decode.device
    model, _ = build_model(cfg, device)
    load_decoding_weights(model, exp_dir, cfg.decode.checkpoint)
    model.eval()
    handle = routing_handle(model)
    sets = list(cfg.decode.test_sets) or list(DEFAULT_TEST_SETS)
    kwargs = generation_kwargs(cfg.decode)
    for name in sets:
        corpus, _, split = name.partition("_")
        path = cfg.data.cuts_path(corpus, split)
        start = time.time()
        if handle is not None:
            handle.statistics_reset()
            handle.statistics_enabled = True
        refs: dict[str, str] = {}
        accents: dict[str, str] = {}

        def batches():  # streams the test set, keeping references and accents by utterance id
            n = 0
            for batch in make_loader(cfg, path, model.num_mel_bins, False, DistInfo()):
                if cfg.decode.max_utterances and n >= cfg.decode.max_utterances:
                    return
                n += len(batch)
                for utt, text, acc in zip(batch.ids, batch.texts, batch.accents.tolist()):
                    refs[utt] = text
                    accents[utt] = ACCENTS[acc] if acc >= 0 else "unknown"
                yield batch

        hyps = transcribe_batches(lambda b: model.transcribe(b, **kwargs), batches(), desc=name)
        routing = handle.statistics_summary() if handle is not None else None
        write_set(exp_dir / "decode" / name, hyps, refs, accents, routing)
        log.info("%s: %d utterances in %.1f s -> %s", name, len(hyps), time.time() - start, exp_dir / "decode" / name)


if __name__ == "__main__":
    main()
