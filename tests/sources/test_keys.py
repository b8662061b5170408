"""Training-checkpoint layouts: nested dicts, prefixes, key maps, EMA weights."""

from __future__ import annotations

import torch

from ckptinit.options import SourceOptions
from ckptinit.sources import load_source
from tests.sources.helpers import _assert_values, _backbone, _shift


def test_moco_v2(ck):
    lm = load_source(str(ck["moco"]))  # the architecture comes from the checkpoint's "arch"
    assert lm.arch_from == "checkpoint" and lm.architecture == "resnet18"
    assert lm.nested_key == "state_dict" and lm.stripped_prefixes == ["module.encoder_q."]
    _assert_values(lm, _backbone(ck["sd"]))
    assert lm.missing_keys == ["fc.weight", "fc.bias"]
    for k in ("module.queue", "module.queue_ptr", "module.encoder_q.fc.0.weight"):
        assert k in lm.dropped_keys
    assert "module.encoder_k.conv1.weight" in lm.dropped_keys
    assert not any(k.startswith("module.encoder_q.layer") for k in lm.dropped_keys)


def test_moco_strip_prefix_override(ck):
    opts = SourceOptions(arch="resnet18", strip_prefix=["module.encoder_k."])
    lm = load_source(str(ck["moco"]), opts)
    _assert_values(lm, _shift(_backbone(ck["sd"]), 1.0))


def test_key_map_renames_after_stripping(ck, tmp_path):
    renamed = {f"model.trunk_{k}": v for k, v in _backbone(ck["sd"]).items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    opts = SourceOptions(arch="resnet18", strip_prefix=["model."], key_map={"trunk_": ""})
    lm = load_source(str(tmp_path / "renamed.pt"), opts)
    _assert_values(lm, _backbone(ck["sd"]))
    assert lm.metadata()["source_key_map"] == "trunk_="


def test_dino_prefers_teacher(ck):
    lm = load_source(str(ck["dino"]), SourceOptions(arch="resnet18"))
    assert lm.nested_key == "teacher" and lm.stripped_prefixes == ["backbone."]
    _assert_values(lm, _backbone(ck["sd"]))
    assert lm.missing_keys == ["fc.weight", "fc.bias"]
    assert set(lm.dropped_keys) == {"head.mlp.0.weight", "head.last_layer.weight_g"}


def test_ema_choice(ck):
    plain = load_source(str(ck["ema"]), SourceOptions(arch="resnet18"))
    assert plain.nested_key == "state_dict"
    _assert_values(plain, ck["sd"])
    ema = load_source(str(ck["ema"]), SourceOptions(arch="resnet18", use_ema=True))
    assert ema.nested_key == "state_dict_ema"
    _assert_values(ema, _shift(ck["sd"], 0.5))
