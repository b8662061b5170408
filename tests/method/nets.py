"""Shared by the between-layer tests: trained-looking nets, spreads, outputs, a BN setup."""

from __future__ import annotations

import timm
import torch
from torch import nn

from ckptinit.method.moves import plan_moves
from ckptinit.method.trace import trace_followers
from ckptinit.method.units import scan_units
from ckptinit.report import UnitRecord
from tests.conftest import smooth_images

LOADED = dict(within=False, weights="keep")


def pretend_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but non-degenerate norm parameters and running statistics, as a checkpoint has
    (timm's zero-init of the last BN gamma would leave whole blocks without gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale / ConvNeXt gamma
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
    return model.eval()


def spread(report, which, names=None):
    rates = [getattr(u, f"rate_{which}") for u in report.units
             if u.between_status in ("ok", "not converged") and (names is None or u.name in names)]
    return max(rates) / min(rates)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).double()


class PlainNet(nn.Module):
    """conv-relu-pool chain into linears: every move is compensated by the next unit."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.f1 = nn.Linear(16, 32)
        self.f2 = nn.Linear(32, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        x = torch.relu(self.c3(x)).mean((2, 3))
        return self.f2(torch.relu(self.f1(x)))


def _bn_setup():
    torch.manual_seed(0)
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=10))
    x = smooth_images(24, 32)
    scan = scan_units(model, x[:2])
    followers = trace_followers(model, x[:2], scan.units)
    plan = plan_moves(model, scan.units, followers, fresh=set())
    records = {u.name: UnitRecord(u.name, u.kind, u.shape) for u in scan.units}
    return model, x, plan, records
