"""The experiment schema: one typed dataclass per section, composed by Hydra.

`conf/config.yaml` picks one YAML per group (data/, model/, adapter/, train/, decode/,
optionally experiment/) and merges them onto `ExperimentConfig`, registered in Hydra's
ConfigStore. The schema is strict: an unknown or misspelt key fails with its name.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from hdmole.adapters.config import AdapterConfig
from hdmole.data.config import DataConfig
from hdmole.decode import DecodeConfig
from hdmole.fileio import write_text_atomic
from hdmole.model.config import ModelConfig
from hdmole.train.config import TrainConfig

log = logging.getLogger(__name__)

SCHEMA_NAME = "experiment_schema"
RESOLVED_NAME = "config.yaml"  # the resolved config saved in every experiment directory
# Keys that saved configs of earlier versions may hold and that no longer exist, with what
# replaced them: dropped (with a warning) when such a directory is read back, so that an
# existing base model or run stays usable; a new config naming them still fails.
RETIRED_KEYS = {("data", "feature_cache_dir"): "stored features: data.feature_storage (stage 1)",
                ("train", "precision"): "model.dtype alone sets the compute dtype"}


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    exp_dir: str = "exp/default"  # outputs of this run: checkpoints, exported model, logs, decodes


def register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)


def default_config_dir() -> Path:
    """conf/ of the checkout (HDMOLE_ROOT from path.sh, else next to the package)."""
    root = os.environ.get("HDMOLE_ROOT")
    return Path(root) / "conf" if root else Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: Sequence[str] = (), config_dir: Path | None = None,
                   config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides (`adapter=lora train.lr=1e-4`)."""
    register_schema()
    config_dir = (config_dir or default_config_dir()).resolve()
    if not (config_dir / f"{config_name}.yaml").exists():
        raise FileNotFoundError(f"no {config_name}.yaml in {config_dir}")
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    check_schema(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg


def check_schema(cfg: DictConfig) -> None:
    """Hydra lets `+key=value` append even to a structured node; re-merging onto the schema
    rejects any key the dataclasses do not declare."""
    try:
        OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.to_container(cfg))
    except Exception as e:
        raise ValueError(f"config does not match the schema: {e}") from e


def to_object(cfg: DictConfig) -> ExperimentConfig:
    """Typed dataclasses (runs each section's own validation in __post_init__)."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, ExperimentConfig):
        raise TypeError(f"config did not compose onto ExperimentConfig (got {type(obj).__name__})")
    return obj


def save_resolved(cfg: DictConfig, exp_dir: Path) -> Path:
    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / RESOLVED_NAME
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def load_resolved(exp_dir: Path, overrides: Sequence[str] = (), allowed_prefixes: Sequence[str] = ("decode.",)
                  ) -> DictConfig:
    """A training run's saved config, typed against the schema, with `section.key=value`
    overrides restricted to `allowed_prefixes` (decoding may change decoding, not the model)."""
    path = exp_dir / RESOLVED_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {exp_dir} is not a finished training run")
    saved = OmegaConf.load(path)
    for (section, key), replacement in RETIRED_KEYS.items():
        if key in saved.get(section, {}):
            log.warning("%s: %s.%s is no longer an option (%s); ignored", path, section, key, replacement)
            del saved[section][key]
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), saved)
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+")
        if not sep or not key.startswith(tuple(allowed_prefixes)):
            raise ValueError(f"override {item!r}: only {', '.join(p + '<key>=<value>' for p in allowed_prefixes)} "
                             f"may change here; the rest comes from {path}")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise KeyError(f"override {item!r}: no key {key!r} in the schema")
        OmegaConf.update(cfg, key, yaml.safe_load(value) if value else value, merge=False)
    return cfg
