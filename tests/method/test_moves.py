"""Moves: what follows a unit, and how the plan groups the units."""

from __future__ import annotations

import timm

from ckptinit.method.moves import plan_moves
from ckptinit.method.trace import trace_followers
from ckptinit.method.units import scan_units
from tests.conftest import smooth_images


def test_resnet_followers_are_batchnorm_and_fc_is_pinned_when_loaded():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x = smooth_images(2, 32)
    scan = scan_units(model, x)
    followers = trace_followers(model, x, scan.units)
    assert followers["layer1.0.conv1"].kind == "batchnorm"
    assert followers["layer1.0.conv1"].target == "layer1.0.bn1"
    assert followers["fc"].kind == "output"
    plan = plan_moves(model, scan.units, followers, fresh=set())
    assert plan.group_of("fc").kind == "pinned"
    assert plan_moves(model, scan.units, followers, fresh={"fc"}).group_of("fc").kind == "free"
