"""The unit scan (method/units.py): what one probing forward pass finds out."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ckptinit.api import rescale
from ckptinit.method.units import scan_units
from ckptinit.options import RescaleOptions
from tests.conftest import smooth_images


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
