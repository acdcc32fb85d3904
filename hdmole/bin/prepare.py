"""Stages 0-1: corpus, cut sets, stored features, tokenizer + tiny checkpoints. Arguments after the step are
Hydra overrides of the experiment config (the same ones run.sh gives training), e.g.

    hdmole-prepare corpus data.synthetic_size=ci data.corpus_dir=data/synthetic_ci/corpus
    hdmole-prepare check  data.synthetic=false data.kespeech_dir=... data.aishell_dir=...  (checks only)
    hdmole-prepare cuts   data.cuts_dir=data/synthetic_ci/cuts ...
    hdmole-prepare features data.feature_storage=lilcom_chunky data.feature_dir=... model.encoder_dir=...
    hdmole-prepare tiny   [--text-steps N] model.encoder_dir=data/synthetic_ci/tiny/whisper model.llm_dir=data/synthetic_ci/tiny/qwen
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hdmole.bin.common import setup_logging
from hdmole.config import compose_config, to_object
from hdmole.data.prepare import CorpusError

log = logging.getLogger("hdmole.prepare")


def step_corpus(cfg, **_) -> None:
    data = cfg.data
    if data.synthetic:
        from hdmole.data.synthetic import generate

        # The corpus directory belongs to this size and seed: a different plan (a newer
        # generator) means a stale corpus, replaced rather than refused.
        manifest = generate(data.corpus_dir, data.synthetic_size, data.synthetic_seed, data.num_jobs, overwrite=True)
        log.info("synthetic corpus %s: %d utterances, %.2f h", data.corpus_dir, manifest["num_utterances"],
                 manifest["hours"])
    else:
        from hdmole.data.prepare import check_aishell_layout, check_kespeech_layout

        check_kespeech_layout(data.kespeech_root)
        check_aishell_layout(data.aishell_root)
        log.info("real corpora present: %s, %s", data.kespeech_root, data.aishell_root)


def step_cuts(cfg, **_) -> None:
    from hdmole.data.prepare import prepare

    prepare(cfg.data)


def step_check(cfg, **_) -> None:
    """The checks of stage 1 (layout, listings, every wav) without writing anything."""
    from hdmole.data.prepare import CORPORA, check_corpus

    for corpus in CORPORA:
        report = check_corpus(corpus, cfg.data)
        log.info("%s: checks passed; %d audio problems skipped (data.skip_bad), %d files to resample",
                 corpus, sum(report.dropped.values()), report.resampled)


def step_features(cfg, **_) -> None:
    from hdmole.data.features import compute_all_features
    from hdmole.model.encoder import encoder_mel_bins

    if cfg.data.feature_storage is None:
        log.info("data.feature_storage=null: features are computed on the fly, nothing to store")
        return
    compute_all_features(cfg.data, encoder_mel_bins(cfg.model.encoder_dir))


def training_sentences(cfg) -> list[str]:
    from lhotse import load_manifest_lazy

    sentences = []
    for corpus in ("aishell", "kespeech"):
        path = cfg.data.cuts_path(corpus, "train")
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run stage 1 (cut sets) first")
        sentences += [s.text for cut in load_manifest_lazy(path) for s in cut.supervisions if s.text]
    return sentences


def step_tiny(cfg, **pretraining) -> None:
    """Tiny Whisper/Qwen2 checkpoints; `--text-steps N`: N steps of text pre-training of the LM
    first (teaches it the corpus language; default: write_tiny_checkpoints's)."""
    from hdmole.model.tiny import write_tiny_checkpoints

    enc, llm = Path(cfg.model.encoder_dir), Path(cfg.model.llm_dir)
    if enc.parent != llm.parent or enc.name != "whisper" or llm.name != "qwen":
        raise ValueError(f"tiny checkpoints are written as <dir>/whisper and <dir>/qwen; got "
                         f"model.encoder_dir={enc} model.llm_dir={llm}")
    sentences = training_sentences(cfg)
    write_tiny_checkpoints(enc.parent, sentences, seed=cfg.train.seed, **pretraining)
    log.info("tiny checkpoints in %s (tokenizer from %d training sentences)", enc.parent, len(sentences))


def step_corpus_id(cfg, **_) -> None:
    """Print what identifies the corpus (run.sh keys stage 0 on it): the synthetic plan's
    digest, or the real corpus roots."""
    data = cfg.data
    if data.synthetic:
        from hdmole.data.synthetic import CORPUS_VERSION, plan_corpus

        print(f"{CORPUS_VERSION} {data.synthetic_size} seed={data.synthetic_seed} "
              f"plan={plan_corpus(data.synthetic_size, data.synthetic_seed).digest()[:16]}")
    else:
        print(f"real kespeech={data.kespeech_root} aishell={data.aishell_root}")


STEPS = {"corpus-id": step_corpus_id, "corpus": step_corpus, "check": step_check, "cuts": step_cuts,
         "features": step_features, "tiny": step_tiny}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STEPS:
        sys.exit(f"usage: hdmole-prepare {{{','.join(STEPS)}}} [hydra overrides...]\n{__doc__}")
    setup_logging()
    logging.getLogger().setLevel(logging.WARNING if argv[0] == "corpus-id" else logging.INFO)
    start = time.time()
    step, rest = argv[0], argv[1:]
    kwargs = {}
    if step == "tiny" and rest[:1] == ["--text-steps"]:
        kwargs["pretrain_steps"], rest = int(rest[1]), rest[2:]
    cfg = to_object(compose_config(rest))
    try:
        STEPS[step](cfg, **kwargs)
    except CorpusError as err:  # names the file and line: the message is the whole story
        sys.exit(f"ERROR: {err}")
    log.info("prepare %s done in %.1f s", argv[0], time.time() - start)


if __name__ == "__main__":
    main()
