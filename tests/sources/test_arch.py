"""The architecture of a file: --arch, config.json, metadata, the checkpoint's 'arch'."""

from __future__ import annotations

import pytest

from ckptinit.errors import SourceError
from ckptinit.options import SourceOptions
from ckptinit.sources import load_source
from tests.sources.helpers import _assert_values, _backbone


def test_missing_arch_asks_for_it(ck):
    with pytest.raises(SourceError, match="--arch"):
        load_source(str(ck["plain"]))


def test_config_json_beside(ck):
    lm = load_source(str(ck["folder"] / "model.safetensors"))
    assert lm.arch_from == "config.json" and lm.architecture == "resnet18"
    assert lm.model.pretrained_cfg["crop_pct"] == 0.95  # the config's preprocessing is kept
    _assert_values(lm, ck["sd"])


def test_own_metadata_gives_arch(ck):
    lm = load_source(str(ck["own"]))
    assert lm.arch_from == "metadata" and lm.num_classes == 0
    assert lm.model_args == {"global_pool": "avg"}
    _assert_values(lm, _backbone(ck["sd"]))


def test_dino_headless(ck):
    lm = load_source(str(ck["dino"]), SourceOptions(num_classes=0))  # arch from args.arch
    assert lm.arch_from == "checkpoint" and lm.num_classes == 0 and lm.missing_keys == []
    assert lm.model.get_classifier().__class__.__name__ == "Identity"


def test_num_classes_changes_head(ck):
    lm = load_source(str(ck["plain"]), SourceOptions(arch="resnet18", num_classes=10))
    assert lm.num_classes == 10 and lm.missing_keys == ["fc.weight", "fc.bias"]
    assert {"fc.weight", "fc.bias"} <= set(lm.dropped_keys)
    assert lm.shape_mismatches["fc.weight"] == ((1000, 512), (10, 512))
    assert any("--num-classes 1000" in n for n in lm.notes)
