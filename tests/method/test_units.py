"""The unit scan (method/units.py): what one probing forward pass finds out."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from ckptinit.api import rescale
from ckptinit.method.units import called_units, scan_units, weights_reading_data
from ckptinit.options import RescaleOptions
from tests.conftest import smooth_images
from tests.method.nets import movable, outputs, pretend_trained, rates, rel_change


class FunctionalQKV(nn.Module):
    """timm's EVA/BEiT attention pattern: the qkv Linear is never called, its weight is
    passed to F.linear with a bias built from separate q and v biases."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(8))
        self.v_bias = nn.Parameter(torch.zeros(8))
        self.register_buffer("k_bias", torch.zeros(8), persistent=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(t, self.qkv.weight, bias).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1) @ v
        return self.head(a.mean(1))


def test_a_unit_used_only_through_its_weight_is_named_and_warned_about(caplog):
    torch.manual_seed(0)
    model = FunctionalQKV()
    x = smooth_images(24, 16, seed=2)
    scan = scan_units(model, x[:2])
    assert scan.functional == ["qkv"]
    assert [u.name for u in scan.units] == ["stem", "head"]
    _, report = rescale(model, x[:16], RescaleOptions(batch_size=16), holdout=x[16:])
    assert any(n.startswith("WARNING") and "qkv" in n for n in report.notes)
    assert "functional code" in caplog.text


def test_a_weight_shared_with_a_called_unit_is_not_functional():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(6, 6)
            self.dec = nn.Linear(6, 6)
            self.dec.weight = self.enc.weight  # tied, and dec is never called

        def forward(self, x):
            return self.enc(x)

    assert scan_units(Tied(), torch.randn(2, 6)).functional == []


def _tiny_eva(**kwargs) -> nn.Module:
    """timm's EVA-02 (q/v biases outside qkv, RoPE, SwiGLU), two blocks at 32 px."""
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=10,
                             img_size=32, patch_size=8, depth=2, **kwargs)


@torch.no_grad()
def _qkv_output_std(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Channel-averaged std of every attention's q/k/v pre-activation, computed here from
    the attention's input and its parameters as timm's functional path does (eval mode)."""
    inputs = {}
    attns = [m for m in model.modules() if hasattr(m, "q_bias") and hasattr(m, "qkv")]
    hooks = [a.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0]))
             for a in attns]
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for a in attns:
        bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
        y = F.linear(inputs[a], a.qkv.weight, bias).flatten(0, 1)
        out.append(float(y.std(0).mean()))
    return out


def test_timm_eva_qkv_with_separate_biases_is_normalised_as_a_unit():
    """EVA/BEiT/SwinV2 pass qkv.weight to F.linear: for the run, their own flag makes them
    call the unit (same function), so the within-layer step reaches it."""
    torch.manual_seed(0)
    model = _tiny_eva()
    keys = set(model.state_dict())
    x = smooth_images(40, 32, seed=2)
    other = smooth_images(16, 32, seed=9)  # never seen by the step
    assert max(_qkv_output_std(model, other)) < 0.5  # timm's init: far from 1
    with called_units(model) as switched:
        assert switched == ["blocks.0.attn", "blocks.1.attn"]
        assert scan_units(model, x[:2]).functional == []
    assert all(not a.qkv_bias_separate for a in model.modules() if hasattr(a, "q_bias"))
    model, report = rescale(model, x[:32], RescaleOptions(batch_size=32, between=False),
                            holdout=x[32:])
    assert not any(n.startswith("WARNING") for n in report.notes)
    assert {"blocks.0.attn.qkv", "blocks.1.attn.qkv"} <= {u.name for u in report.units}
    assert all(abs(s - 1) < 0.15 for s in _qkv_output_std(model, other))
    assert all(not a.qkv_bias_separate for a in model.modules() if hasattr(a, "q_bias"))
    assert set(model.state_dict()) == keys
    _tiny_eva().load_state_dict(model.state_dict(), strict=True)


def test_loaded_eva_keeps_its_function_with_its_qkv_seen():
    torch.manual_seed(0)
    model = pretend_trained(_tiny_eva())
    x = smooth_images(40, 32, seed=2)
    other = smooth_images(16, 32, seed=9)
    y0 = outputs(model, other)
    model, report = rescale(model, x[:32], RescaleOptions(batch_size=32), fresh=(),
                            holdout=x[32:])
    assert rel_change(outputs(model, other), y0) <= 1e-4
    qkv = next(u for u in report.units if u.name == "blocks.0.attn.qkv")
    assert [s["slice"] for s in qkv.slices] == ["q", "k", "v"]
    # SwiGLU's fused fc1 is act(first half) * second half (gate_last=False): the report names
    # its halves for what they are, and an outside estimator keyed that way measures them
    fc1 = next(u for u in report.units if u.name == "blocks.0.mlp.fc1")
    assert [s["slice"] for s in fc1.slices] == ["gate", "value"]
    assert set(movable(report)) <= set(rates(model, other, draws=2))
    assert not any(n.startswith("WARNING") for n in report.notes)


@pytest.mark.parametrize("conv, side, reading", [
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), 1, 1),  # only the centre tap meets data
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), 2, 9),  # each tap meets data somewhere
    (nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8), 2, 4),  # taps 2 and 3 per side
    (nn.Conv2d(8, 8, 3, padding=0, groups=8), 5, 9),
    (nn.Conv2d(2, 2, 3, padding=1, groups=2), 2, 9),  # fewer channels than taps
    (nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=True), 1, 1),  # a multiplier, a bias
    (timm.layers.Conv2dSame(8, 8, 3, stride=2, groups=8), 1, 1),  # padding in forward
])
def test_weights_reading_data_counts_the_taps_that_meet_the_input(conv, side, reading):
    assert weights_reading_data(conv, (2, conv.in_channels, side, side)) == reading


class MixedDepthwise(nn.Module):
    """timm's MixedConv2d: channel groups through depthwise convs of two kernel sizes,
    joined along channels, then one BatchNorm; on a 1x1 map each has one tap that reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw3 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dw5 = nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a, b = torch.split(self.stem(x), 4, 1)
        return self.fc(self.bn(torch.cat([self.dw3(a), self.dw5(b)], 1)).mean((2, 3)))


def test_depthwise_convs_joined_before_a_batchnorm_are_each_scale_free():
    model = MixedDepthwise()
    assert scan_units(model, torch.randn(4, 3, 1, 1)).scale_free == {"dw3", "dw5"}
    assert scan_units(model, torch.randn(4, 3, 8, 8)).scale_free == set()
