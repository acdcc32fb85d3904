"""Every YAML composes against the typed schema; unknown keys fail; decoding reuses the saved
training config and may only change decode.*."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from hdmole.config import ExperimentConfig, compose_config, load_resolved, save_resolved, to_object

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "adapter", "train", "decode", "experiment"])
def test_every_yaml_composes(group: str):
    choices = group_choices(group)
    assert choices, f"conf/{group}/ has no YAML"
    # presets that need a site-specific value get one (real corpora: roots from db.sh)
    needs = {("data", "real"): ["data.kespeech_dir=/corpora/KeSpeech", "data.aishell_dir=/corpora/aishell"]}
    for choice in choices:
        cfg = to_object(compose_config([f"{group}={choice}", *needs.get((group, choice), [])]))
        assert isinstance(cfg, ExperimentConfig)


def test_experiment_presets_set_training_phases():
    enc = to_object(compose_config(["experiment=base_encoder"]))
    assert (enc.model.freeze_encoder, enc.model.asr_weight, enc.adapter.method) == (False, 0.0, "none")
    adapt = to_object(compose_config(["experiment=adapt", "adapter=mole_topk"]))
    assert adapt.model.freeze_projector and adapt.adapter.method == "mole" and adapt.adapter.selection == "topk"


@pytest.mark.parametrize("override", ["train.lrr=1", "+train.lrr=1", "adapter.rnak=4", "decode.beams=2", "bogus=1"])
def test_unknown_keys_fail(override: str):
    with pytest.raises((ConfigCompositionException, ValueError), match=r"lrr|rnak|beams|bogus"):
        compose_config([override])


def test_bad_values_fail_naming_the_key():
    with pytest.raises(Exception, match="selection"):
        to_object(compose_config(["adapter.selection=topq"]))
    with pytest.raises(Exception, match="max_steps"):
        compose_config(["train.max_steps=many"])


def test_decoding_reuses_saved_config(tmp_path: Path):
    cfg = compose_config(["adapter=lora", "train.lr=0.0005", f"exp_dir={tmp_path}"])
    save_resolved(cfg, tmp_path)
    loaded = to_object(load_resolved(tmp_path, ["decode.num_beams=4", "decode.test_sets=[kespeech_test]"]))
    assert loaded.adapter.method == "lora" and loaded.train.lr == 0.0005
    assert loaded.decode.num_beams == 4 and loaded.decode.test_sets == ["kespeech_test"]
    with pytest.raises(ValueError, match="only decode"):
        load_resolved(tmp_path, ["adapter.rank=2"])
    with pytest.raises(KeyError, match="no key"):
        load_resolved(tmp_path, ["decode.beams=2"])
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        load_resolved(tmp_path / "nope")


def test_saved_configs_of_earlier_versions_drop_retired_keys(tmp_path: Path, caplog):
    """A run directory written before data.feature_cache_dir was retired still loads (a base
    model to adapt from); a new config naming the key still fails."""
    cfg = compose_config(["adapter=lora", f"exp_dir={tmp_path}"])
    save_resolved(cfg, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text.replace("data:\n", "data:\n  feature_cache_dir: data/feats\n", 1))
    assert to_object(load_resolved(tmp_path)).adapter.method == "lora"
    assert "feature_cache_dir is no longer an option" in caplog.text
    with pytest.raises(Exception, match="feature_cache_dir"):
        compose_config(["data.feature_cache_dir=data/feats"])
    (tmp_path / "config.yaml").write_text(text.replace("data:\n", "data:\n  feature_cache: data/feats\n", 1))
    with pytest.raises(Exception, match="feature_cache"):
        load_resolved(tmp_path)
