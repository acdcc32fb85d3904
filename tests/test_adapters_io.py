"""hdmole.adapters: save/load, merge, and the Hydra presets under conf/adapter/."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from hdmole.adapters import (AdapterConfig, inject, load_adapter, load_adapter_config, merge,
                             save_adapter)
from test_adapters import A, D_FEAT, Projector, batch, make

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "adapter"
PRESETS = ("base", "full", "lora", "lora_active", "mole_dense", "mole_topk", "mole_topp", "adamole",
           "oracle_accent", "hdmole", "hdmole_no_hier", "hdmole_topk")


def load_preset(name: str) -> AdapterConfig:
    """What Hydra does with a group file over a structured schema: strict merge."""
    merged = OmegaConf.merge(OmegaConf.structured(AdapterConfig),
                             OmegaConf.load(PRESET_DIR / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def test_every_preset_exists_and_nothing_else():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(PRESETS)
    for name in PRESETS:
        assert (PRESET_DIR / f"{name}.yaml").read_text().startswith("# @package adapter\n")


def test_presets_state_only_their_differences_from_the_defaults():
    default = AdapterConfig()
    for name in PRESETS:
        values = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{name}.yaml"))
        same = [k for k, v in values.items() if getattr(default, k) == v and (name, k) != ("hdmole", "method")]
        assert not same, f"{name}.yaml restates defaults: {same}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_runs(name):
    cfg = load_preset(name)
    module = Projector()
    handle = inject(module, cfg, num_accents=A, accent_feature_dim=D_FEAT)
    x, feats, fmask, labels, tmask = batch()
    with handle.routing(feats, fmask, labels, tmask):
        y = module(x)
    assert torch.isfinite(y).all()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if name == "base":
        assert trainable == 0 and not handle.trainable_parameters()
    else:
        assert trainable > 0


def test_presets_differ_as_documented():
    hd, no_hier, topk = load_preset("hdmole"), load_preset("hdmole_no_hier"), load_preset("hdmole_topk")
    assert (hd.selection, hd.global_router, hd.combine) == ("threshold", "learned", "prior")
    assert (no_hier.selection, no_hier.global_router) == ("threshold", "none")
    assert (topk.selection, topk.global_router) == ("topk", "learned")
    assert load_preset("adamole").selection == "token_threshold"
    assert load_preset("oracle_accent").global_router == "oracle"


def test_preset_with_unknown_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# @package adapter\nmethod: mole\nnum_expert: 4\n")
    with pytest.raises(Exception, match="num_expert"):
        OmegaConf.merge(OmegaConf.structured(AdapterConfig), OmegaConf.load(bad))


def test_hydra_composes_a_preset_over_the_schema_defaults():
    from hdmole.config import compose_config

    root = compose_config(["adapter=hdmole_topk"], config_dir=PRESET_DIR.parent)
    assert root.adapter.selection == "topk" and root.adapter.top_k == 2  # top_k: the default
    assert root.adapter.global_router == "learned"


@pytest.mark.parametrize("kw", [dict(selection="threshold"), dict(selection="token_threshold",
                                global_router="none", combine="local"), dict(method="lora"),
                                dict(method="full")])
def test_save_load_roundtrip_gives_identical_outputs(tmp_path, kw):
    src_module, src = make(seed=0, **kw)
    save_adapter(src, tmp_path)
    cfg, num_accents, feat_dim = load_adapter_config(tmp_path)
    assert cfg == src.cfg and num_accents == A and feat_dim == D_FEAT
    # Same seed: same frozen base (the pre-trained model); adapter still at its init (B = 0).
    dst_module, dst = make(seed=0, randomise=False, **kw)
    assert dst.cfg == cfg
    x, feats, fmask, labels, tmask = batch()
    with dst.routing(feats, fmask, labels, tmask):
        before = dst_module(x)
    load_adapter(dst, tmp_path)
    with src.routing(feats, fmask, labels, tmask):
        want = src_module(x)
    with dst.routing(feats, fmask, labels, tmask):
        got = dst_module(x)
    assert torch.equal(got, want) and not torch.equal(before, want)
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"adapter.safetensors", "adapter_config.json"}


def test_load_rejects_a_different_config(tmp_path):
    _, src = make(seed=0)
    save_adapter(src, tmp_path)
    _, other = make(seed=0, rank=AdapterConfig().rank + 4)
    with pytest.raises(ValueError, match="rank"):
        load_adapter(other, tmp_path)


def test_merge_oracle_accent_equals_label_routing():
    module, handle = make("dense", "oracle", "global")
    x, *_ = batch()
    for accent in range(A):
        labels = torch.full((x.shape[0],), accent)
        with torch.no_grad(), handle.routing(accent_labels=labels):
            want = module(x)
        merged = merge(handle, accent)
        assert all(type(m) is nn.Linear for m in merged.values())
        got = merged["linear2"](torch.relu(merged["linear1"](x)))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    merge(handle, 1, inplace=True)
    assert type(module.linear1) is nn.Linear


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_merge_with_threshold_or_topk_selection_on_oracle(selection):
    module, handle = make(selection, "oracle", "global" if selection == "threshold" else "prior")
    if selection == "topk":
        with pytest.raises(ValueError, match="combine='prior'"):
            merge(handle, 0)
        return
    x, *_ = batch()
    with torch.no_grad(), handle.routing(accent_labels=torch.full((3,), 2)):
        want = module(x)
    merged = merge(handle, 2)
    assert torch.allclose(merged["linear2"](torch.relu(merged["linear1"](x))), want, rtol=1e-5, atol=1e-4)


def test_merge_lora_and_refuses_input_dependent_routing():
    module, handle = make(method="lora")
    x = batch()[0]
    with torch.no_grad():
        want = module(x)
    merged = merge(handle)
    assert torch.allclose(merged["linear2"](torch.relu(merged["linear1"](x))), want, rtol=1e-5, atol=1e-4)
    _, hd = make("threshold")
    with pytest.raises(ValueError, match="depends on the input"):
        merge(hd, 0)
