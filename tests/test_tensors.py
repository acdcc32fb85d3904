"""hdmole.tensors.copy_named_tensors and the loaders built on it (checkpoints, exports)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from hdmole.tensors import copy_named_tensors
from hdmole.train.checkpoint import load_trainable_state, trainable_state
from hdmole.train.export import exported_state, load_export, save_export


def test_copies_values_in_place_converting_dtype():
    a, b = torch.zeros(2, 3), torch.zeros(4, dtype=torch.float16)
    targets = {"a": a, "b": b}
    copy_named_tensors(targets, {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.arange(4.0)}, "f")
    assert targets["a"] is a and torch.equal(a, torch.ones(2, 3))
    assert b.dtype == torch.float16 and b.tolist() == [0, 1, 2, 3]


def test_a_subset_is_copied_and_the_rest_kept():
    targets = {"a": torch.zeros(2), "b": torch.zeros(2)}
    copy_named_tensors(targets, {"b": torch.ones(2)}, "f")
    assert targets["a"].tolist() == [0, 0] and targets["b"].tolist() == [1, 1]


def test_parameters_that_require_grad_are_copied_without_autograd():
    p = nn.Parameter(torch.zeros(3))
    copy_named_tensors({"p": p}, {"p": torch.ones(3)}, "f")
    assert p.requires_grad and p.grad_fn is None and p.tolist() == [1, 1, 1]


def test_shape_mismatch_names_source_key_and_both_shapes_and_copies_nothing():
    targets = {"a": torch.zeros(2), "w": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"^exp/model/weights\.safetensors: w has shape \(4, 3\), "
                                         r"the model has \(3, 4\)$"):
        copy_named_tensors(targets, {"a": torch.ones(2), "w": torch.ones(4, 3)}, "exp/model/weights.safetensors")
    assert targets["a"].tolist() == [0, 0]  # checked before anything is written


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match=r"^src: 1 tensors not in the model, e\.g\. \['nope'\]$"):
        copy_named_tensors({"a": torch.zeros(1)}, {"nope": torch.zeros(1)}, "src")


def toy(inputs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 3), nn.LayerNorm(3))


def test_checkpoint_round_trip_and_shape_error():
    model, other = toy(), toy()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    load_trainable_state(other, trainable_state(model), "ckpt.pt")
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    with pytest.raises(ValueError, match=r"^ckpt\.pt: 0\.weight has shape \(3, 4\), the model has \(3, 5\)$"):
        load_trainable_state(toy(5), trainable_state(model), "ckpt.pt")


def test_export_round_trip_and_shape_error(tmp_path: Path):
    model = toy()
    save_export(tmp_path / "run", exported_state(model, set()), {"step": 1})
    other = toy()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    loaded = load_export(other, tmp_path / "run")
    assert loaded == {id(p) for p in other.parameters()}
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    weights = tmp_path / "run" / "model" / "weights.safetensors"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))}: 0\.weight has shape \(3, 4\), "
                                         r"the model has \(3, 5\)$"):
        load_export(toy(5), tmp_path / "run")
