"""The shipped pre-trained tiny base model (`pretrained/`): export a finished stage-2 run, and
install it as a recipe's base model.

Layout (Hugging Face directories, safetensors, float16):

    pretrained/whisper/   config.json, model.safetensors (trained WhisperEncoder), preprocessor_config.json
    pretrained/qwen/      config.json, model.safetensors (trained Qwen2), tokenizer files
    pretrained/projector.safetensors   the frame-concat projector (names as in LLMASR: projector.*)
    pretrained/base.json  corpus version, model config, command, seed, scores
    pretrained/CORPUS_VERSION          one line: the stage-0 key of the corpus it was trained on
    pretrained/train_log_*.jsonl, RESULTS.md

Installing writes a normal base run directory (config.yaml + model/ export holding the
projector) whose model config points at pretrained/whisper and pretrained/qwen, so stage 3
adapts it exactly like a base trained in place.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
META_FILE = "base.json"
CORPUS_FILE = "CORPUS_VERSION"
# Files the tokenizer may consist of (copied as they are).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt")
# Every weight file must stay small enough to commit (git hosting limits, 25 MB total).
MAX_FILE_BYTES = 16 * 2**20


def corpus_version(pretrained_dir: str | Path) -> str:
    path = Path(pretrained_dir) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no corpus version (not a shipped base model directory)")
    return path.read_text(encoding="utf-8").strip()


def export_base(run_dir: str | Path, out_dir: str | Path, corpus: str, meta: dict[str, Any] | None = None,
                dtype: torch.dtype = torch.float16) -> Path:
    """Write a finished stage-2 run (its exported `model/`) as a shipped base in `out_dir`.

    The model is the pre-trained checkpoints of the run's config with the export loaded over
    them: the export holds every tensor the run changed, those it got from train.init_from
    included (hdmole.train.export), so init_from itself is not read."""
    from hdmole.config import load_resolved, to_object
    from hdmole.model import LLMASR
    from hdmole.train.export import load_export

    run_dir, out = Path(run_dir), Path(out_dir)
    cfg = to_object(load_resolved(run_dir))
    if cfg.adapter.method != "none":
        raise ValueError(f"{run_dir}: trained with adapter {cfg.adapter.method!r}; export a base run (no adapter)")
    model = LLMASR.from_config(cfg.model, device="cpu")
    load_export(model, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    whisper_dir, llm_dir = out / "whisper", out / "qwen"
    model.encoder.whisper.to(dtype).save_pretrained(whisper_dir)
    shutil.copy(Path(cfg.model.encoder_dir) / "preprocessor_config.json", whisper_dir)
    model.llm.to(dtype).save_pretrained(llm_dir)
    model.prompts.tokenizer.save_pretrained(llm_dir)
    projector = {f"projector.{k}": v.detach().to(dtype).contiguous() for k, v in model.projector.state_dict().items()}
    save_file(projector, str(out / PROJECTOR_FILE))
    (out / CORPUS_FILE).write_text(corpus.strip() + "\n", encoding="utf-8")
    model_cfg = {k: getattr(cfg.model, k) for k in ("projector_downsample", "projector_hidden", "pad_to_30s",
                                                     "pad_to_30s_keep_padding", "instruction", "eos_token")}
    info = {"corpus_version": corpus.strip(), "model": model_cfg, "dtype": str(dtype).replace("torch.", ""),
            "parameters": {"encoder": sum(p.numel() for p in model.encoder.parameters()),
                           "projector": sum(p.numel() for p in model.projector.parameters()),
                           "llm": sum(p.numel() for p in model.llm.parameters())},
            **(meta or {})}
    (out / META_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    too_big = [f"{p} ({p.stat().st_size / 2**20:.1f} MB)" for p in out.rglob("*") if p.is_file()
               and p.stat().st_size > MAX_FILE_BYTES]
    if too_big:
        raise ValueError(f"shipped base files over {MAX_FILE_BYTES // 2**20} MB: {too_big}")
    log.info("shipped base written to %s (%.1f MB)", out, sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20)
    return out


def check_corpus(pretrained_dir: str | Path, corpus: str) -> None:
    shipped = corpus_version(pretrained_dir)
    if shipped != corpus.strip():
        raise ValueError(f"{pretrained_dir} was trained on corpus '{shipped}', this recipe's corpus is "
                         f"'{corpus.strip()}': retrain the base (run.sh --train-base true)")


class BasePlan(NamedTuple):
    """Where stage 2's base model comes from: `existing` (kept as it is), `shipped` (installed
    from pretrained/) or `train` (trained here; run.sh skips it when its marker is current)."""
    decision: str
    reason: str


def plan_base(train_base: str, model: str, pretrained: str, corpus: str, base_dir: str | Path,
              marker: str | Path, key: str) -> BasePlan:
    """run.sh's --train-base auto|true|false. auto: the shipped base when the model is tiny,
    `pretrained` is given and matches `corpus`, and this corpus's own base is not up to date
    (`marker`, stage 2's done marker, does not hold `key`, the trained base's settings);
    otherwise train. true: train (run.sh removes the old base first). false: the base in
    `base_dir` must exist."""
    if train_base == "false":
        if not (Path(base_dir) / "model" / "done").is_file():
            raise FileNotFoundError(f"--train-base false but no finished base model in {base_dir}")
        return BasePlan("existing", f"--train-base false: the existing base model in {base_dir}")
    if train_base == "true":
        return BasePlan("train", "--train-base true: retraining from scratch")
    if train_base != "auto":
        raise ValueError(f"--train-base {train_base}: choose auto, true or false")
    if model != "tiny":
        return BasePlan("train", f"no shipped base for model {model}")
    if not pretrained:
        return BasePlan("train", "--pretrained '': never the shipped base")
    marker = Path(marker)
    if marker.is_file() and marker.read_text(encoding="utf-8").rstrip("\n") == key:  # as run_stage compares
        return BasePlan("train", "the base trained here for this corpus is up to date")
    try:
        shipped = corpus_version(pretrained)
    except FileNotFoundError:
        return BasePlan("train", f"no shipped base in {pretrained} (no {CORPUS_FILE})")
    if shipped != corpus.strip():
        return BasePlan("train", f"shipped base {pretrained} was trained on corpus '{shipped}', not '{corpus.strip()}'")
    return BasePlan("shipped", f"shipped base {pretrained} matches corpus '{shipped}'")


def model_overrides(pretrained_dir: str | Path) -> list[str]:
    """Hydra overrides that make a run load the shipped encoder, LLM and projector shape."""
    d = Path(pretrained_dir)
    meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))["model"]
    return [f"model.encoder_dir={d / 'whisper'}", f"model.llm_dir={d / 'qwen'}",
            f"model.projector_downsample={meta['projector_downsample']}",
            f"model.projector_hidden={meta['projector_hidden']}"]


BASE_MODEL_KEYS = ("encoder_dir", "llm_dir", "projector_downsample", "projector_hidden")


def base_model_overrides(base_dir: str | Path) -> list[str]:
    """The model keys a finished base run was built with (its saved config.yaml): adaptation
    must build the same model, whether the base was trained here or installed from pretrained/."""
    import yaml

    from hdmole.config import RESOLVED_NAME

    path = Path(base_dir) / RESOLVED_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resolved config (is {base_dir} a finished base run?)")
    model = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]
    return [f"model.{k}={model[k]}" for k in BASE_MODEL_KEYS]


def install_base(pretrained_dir: str | Path, base_dir: str | Path, corpus: str, overrides: Sequence[str] = ()) -> Path:
    """Replace `base_dir` by a finished base run backed by the shipped model (checked against
    the corpus version). `overrides`: the recipe's common Hydra overrides (data paths etc.)."""
    from hdmole.config import compose_config, save_resolved
    from hdmole.provenance import save_provenance
    from hdmole.train.export import save_export

    pretrained_dir, base_dir = Path(pretrained_dir), Path(base_dir)
    check_corpus(pretrained_dir, corpus)
    shutil.rmtree(base_dir, ignore_errors=True)  # nothing of a base trained there before stays
    cfg = compose_config([*overrides, "experiment=base_llm", *model_overrides(pretrained_dir), f"exp_dir={base_dir}"])
    # The shipped LLM and encoder are the pre-trained checkpoints now: only the projector is
    # the run's own tensor (what a paper-scale base trains, too).
    cfg.model.freeze_encoder = True
    cfg.model.freeze_llm = True
    save_resolved(cfg, base_dir)
    save_provenance(base_dir, [f"install {pretrained_dir}"])
    state = {k: v.float() for k, v in load_file(str(pretrained_dir / PROJECTOR_FILE)).items()}
    meta = json.loads((pretrained_dir / META_FILE).read_text(encoding="utf-8"))
    info = {"trainable_params": 0, "step": meta.get("step"), "stop_reason": f"shipped base {pretrained_dir}",
            "pretrained": str(pretrained_dir), "corpus_version": meta["corpus_version"]}
    (base_dir / "model_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    save_export(base_dir, state, info)
    return base_dir
