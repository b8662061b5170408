"""Preprocessing: the model's data config with overrides; one-channel models."""

from __future__ import annotations

import pytest
import timm
import torch

from ckptinit.data import load_calibration, resolve_data_config
from ckptinit.errors import UsageError
from ckptinit.options import CalibrationOptions
from tests.data.helpers import SIZE, opts


def test_resolve_data_config_overrides(model):
    cfg = resolve_data_config(model, CalibrationOptions())
    assert cfg["input_size"] == (3, 224, 224)
    cfg = resolve_data_config(
        model,
        CalibrationOptions(input_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                           crop_pct=1.0, interpolation="bilinear"),
    )
    assert cfg == {
        "input_size": (3, 48, 48), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25), "crop_pct": 1.0, "crop_mode": "center",
    }
    with pytest.raises(UsageError):
        resolve_data_config(model, CalibrationOptions(interpolation="random"))
    with pytest.raises(UsageError):
        resolve_data_config(model, CalibrationOptions(std=(1.0, 0.0, 1.0)))


def test_grey_model_gets_one_channel():
    grey = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    cs = load_calibration(grey, opts(images=3, holdout=0, mean=(0.5,), std=(0.5,)))
    assert cs.images.shape == (3, 1, SIZE, SIZE)
    with torch.no_grad():
        grey.eval()(cs.images)
