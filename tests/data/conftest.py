"""The model the calibration-data tests preprocess for."""

from __future__ import annotations

import pytest
import timm
import torch


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=0)
