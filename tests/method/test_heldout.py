"""The held-out check's contrast gain (method/heldout.py): how strongly the eval-mode output
scale follows the images' contrast, against nets whose exponent is known in closed form,
and the warning a fresh net gets when it is expansive."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ckptinit.api import rescale
from ckptinit.method.heldout import CONTRAST_GAIN_LIMIT
from ckptinit.options import RescaleOptions
from tests.conftest import smooth_images
from tests.method.nets import LOADED, PlainNet

KEEP = RescaleOptions(**LOADED, between=False, batch_size=16)


class Power(nn.Module):
    """Products of conv branches: the output is homogeneous of degree `2 ** depth` in a
    bias-free input (degree 4 for depth 2)."""

    def __init__(self, depth: int = 2, bias: bool = False) -> None:
        super().__init__()
        self.a = nn.ModuleList(nn.Conv2d(3, 3, 1, bias=bias) for _ in range(depth))
        self.b = nn.ModuleList(nn.Conv2d(3, 3, 1, bias=bias) for _ in range(depth))
        self.fc = nn.Linear(3, 4, bias=bias)

    def forward(self, x):
        for a, b in zip(self.a, self.b):
            x = a(x) * b(x)
        return self.fc(x.mean((2, 3)))


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.norm = PlainNet(), nn.LayerNorm(5, elementwise_affine=False)

    def forward(self, x):
        return self.norm(self.net(x))


def _bias_free(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    return model


@pytest.mark.parametrize("make,gain", [
    (lambda: _bias_free(PlainNet()), 1.0),  # ReLU chain, no bias: f(cx) = c f(x)
    (lambda: Power(depth=2), 4.0),
    (Normed, 0.0),  # a final norm takes the scale away
])
def test_contrast_gain_is_the_output_scale_exponent(make, gain):
    torch.manual_seed(0)
    x = smooth_images(24, 16)
    _, report = rescale(make(), x[:16], KEEP, fresh=(), holdout=x[16:])
    assert report.output_contrast_gain == pytest.approx(gain, abs=1e-3)


def test_an_expansive_fresh_net_is_warned_about_and_a_loaded_one_is_not(caplog):
    torch.manual_seed(0)
    x = smooth_images(48, 16)
    with caplog.at_level(logging.WARNING, logger="ckptinit"):
        model, fresh = rescale(Power(depth=2, bias=True), x[:32],
                           RescaleOptions(between=False, batch_size=32), holdout=x[32:])
    assert fresh.output_contrast_gain > CONTRAST_GAIN_LIMIT
    assert any(n.startswith("contrast gain:") for n in fresh.notes)
    assert any("contrast" in r.getMessage() for r in caplog.records)
    _, loaded = rescale(model, x[:32], KEEP, fresh=(), holdout=x[32:])  # kept as it is
    assert loaded.output_contrast_gain == pytest.approx(fresh.output_contrast_gain)
    assert not any(n.startswith("contrast gain:") for n in loaded.notes)
    _, plain = rescale(PlainNet(), x[:32], RescaleOptions(between=False, batch_size=32),
                       holdout=x[32:])
    assert plain.output_contrast_gain < CONTRAST_GAIN_LIMIT
    assert not any(n.startswith("contrast gain:") for n in plain.notes)


def test_the_rate_spread_is_re_measured_on_held_out_images_only_when_there_are_some():
    """Other images and other gradient draws: the step's own spread is about 1 by
    construction, the held-out one is not, and it must still show the step's gain."""
    import timm

    from ckptinit.cli.render import summary_line

    images, holdout = smooth_images(16, 32), smooth_images(8, 32, seed=3)
    options = RescaleOptions(batch_size=16, device="cpu")
    model = timm.create_model("test_resnet", pretrained=False)
    _, report = rescale(model, images, options, holdout=holdout)
    held = report.rate_spread_heldout
    assert held is not None and held > report.rate_spread("after")
    assert held < report.rate_spread("before") / 2
    assert "on held-out images, other draws" in summary_line(report)
    report.data = {"holdout_overlaps": True}  # what too few distinct images give (data/)
    line = summary_line(report)
    assert "on other crops of the calibration images, other draws" in line
    assert "output std on other crops of the calibration images" in line
    assert report.to_dict()["rate_spread_heldout"] == held
    _, report = rescale(timm.create_model("test_resnet", pretrained=False), images, options)
    assert report.rate_spread_heldout is None  # no held-out images: nothing to re-measure
