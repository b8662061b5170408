"""Gates (squeeze-excite, ECA): found by the scan, given near-constant logits by the
within-layer step, and the output-scale check that says when a fresh net's scale does not
carry over to held-out images."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ckptinit.api import rescale
from ckptinit.method.units import scan_units
from ckptinit.method.within import GATE_STD
from ckptinit.options import RescaleOptions
from tests.conftest import smooth_images
from tests.method.test_within import heldout_stds


class SE(nn.Module):
    def __init__(self, c: int, gate) -> None:
        super().__init__()
        self.reduce, self.expand, self.gate = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1), gate

    def forward(self, x):
        s = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * self.gate(self.expand(s))


class ECA(nn.Module):  # timm's EcaModule: a conv1d over pooled channels, expand_as
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1).expand_as(x)


class GLU(nn.Module):  # a gate of the features' own shape is an activation, not a gate
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x))


class Swish(nn.Module):  # x * sigmoid(x) by hand: not a gate either
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        z = self.conv(x)
        return z * torch.sigmoid(z)


class GatedNet(nn.Module):
    def __init__(self, depth: int = 4, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"conv": nn.Conv2d(c, c, 3, padding=1), "bn": nn.BatchNorm2d(c),
                           "se": SE(c, nn.Sigmoid())}) for _ in range(depth))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = b["se"](torch.relu(b["bn"](b["conv"](x))))
        return self.head(x.mean((2, 3)))


def test_scan_finds_broadcast_gates_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SE(8, nn.Sigmoid()), SE(8, nn.Hardsigmoid()),
                          ECA(), GLU(8), Swish(8))
    gates = scan_units(model, torch.randn(2, 3, 8, 8)).gates
    assert gates == {"1.expand", "2.expand", "3.conv"}


def test_gate_logits_get_a_small_std_on_heldout_images():
    torch.manual_seed(0)
    model = GatedNet()
    fit, other = smooth_images(48, 32, seed=1), smooth_images(48, 32, seed=2)
    _, report = rescale(model, fit, RescaleOptions(between=False, batch_size=48))
    stds = heldout_stds(model, other, eval_mode=True)
    for i in range(4):
        gate = float(stds[f"blocks.{i}.se.expand"].mean())
        assert 0.3 * GATE_STD < gate < 3 * GATE_STD, (i, gate)
        assert abs(float(stds[f"blocks.{i}.conv"].mean()) - 1) < 0.3
        assert "gate logits" in report.unit(f"blocks.{i}.se.expand").note


def test_output_scale_is_measured_on_heldout_images_and_warned_about(caplog):
    torch.manual_seed(0)
    fit, held = smooth_images(32, 32, seed=1), smooth_images(16, 32, seed=2)
    model, same = rescale(GatedNet(), fit, RescaleOptions(between=False, batch_size=32),
                          holdout=held)
    assert 0.5 * same.options["head_std"] <= same.output_std <= 2.0 * same.options["head_std"]
    # the report's held-out unit statistics are what this test measures with its own hooks
    stds = heldout_stds(model, held, eval_mode=True)
    for name in ("stem", "blocks.2.conv", "blocks.3.se.expand", "head"):
        assert same.unit(name).std_heldout == pytest.approx(float(stds[name].mean()), rel=1e-4)
    assert not any("output scale" in n for n in same.notes)
    # held-out images 20x brighter than anything fitted: the scale does not carry over
    with caplog.at_level(logging.WARNING, logger="ckptinit"):
        _, far = rescale(GatedNet(), fit, RescaleOptions(between=False, batch_size=32),
                         holdout=20 * smooth_images(16, 32, seed=2))
    assert far.output_std > 2.0
    assert any("output scale" in n for n in far.notes)
    assert any("outside [0.25, 1]" in r.getMessage() for r in caplog.records)  # x head std
