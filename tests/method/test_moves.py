"""The plan: what absorbs each move, and moves applied exactly in eval mode."""

from __future__ import annotations

import timm
import torch

from ckptinit.method.moves import apply_scales_, plan_moves
from ckptinit.method.units import scan_units
from tests.conftest import smooth_images
from tests.method.nets import outputs, pretend_trained, rel_change


def test_resnet_convs_move_against_their_batchnorm_and_fc_through_the_stream():
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=10))
    x = smooth_images(4, 32)
    plan = plan_moves(model, scan_units(model, x[:2]).units, x, fresh=set())
    assert not plan.pinned
    assert plan.compensation["layer1.0.conv1"] == "layer1.0.bn1 statistics"
    assert "layer4" in plan.compensation["fc"]  # the last stage's BatchNorm affines


def test_batchnorm_statistics_follow_their_input_in_eval_mode():
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=10))
    x = smooth_images(8, 32)
    plan = plan_moves(model, scan_units(model, x[:2]).units, x, fresh=set())
    y0 = outputs(model, x)
    z = plan.basis @ torch.randn(plan.basis.shape[1], dtype=torch.float64)
    apply_scales_(model, plan, z)
    assert rel_change(outputs(model, x), y0) < 1e-5
