"""A BatchNorm fed straight by a unit the within pass rewrote uses the known moments: the
result must be the one train-mode BatchNorm gives, and only such BatchNorms may take it."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ckptinit.method import fed_batchnorm
from ckptinit.method.units import scan_units
from ckptinit.method.within import normalize_within_
from ckptinit.report import UnitRecord


class ActBeforeNorm(nn.Module):
    """conv -> ReLU -> BN (fed an activation: must run as usual), then conv -> BN (fed)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn1(torch.relu(self.c1(x)))
        return self.fc(torch.relu(self.bn2(self.c2(x))).mean((2, 3)))


class InPlaceActBeforeNorm(nn.Module):
    """conv -> ReLU(inplace) -> BN: the BN gets the conv's output object, changed in place."""

    def __init__(self):
        super().__init__()
        self.c1, self.act, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), \
            nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn1(self.act(self.c1(x))).mean((2, 3)))


def _within(model, x, batches: int, shortcut: bool, monkeypatch) -> tuple[dict, list[str]]:
    served: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    pre, offer = fed_batchnorm.FedBatchNorms._pre, fed_batchnorm.FedBatchNorms.offer

    def spy(self, module, args):
        pre(self, module, args)
        if module in self.pending:
            served.append(names[module])

    monkeypatch.setattr(fed_batchnorm.FedBatchNorms, "_pre", spy)
    monkeypatch.setattr(fed_batchnorm.FedBatchNorms, "offer",
                        offer if shortcut else (lambda self, out, moments: None))
    scan = scan_units(model, x[:2])
    records = {u.name: UnitRecord(name=u.name, kind="conv", shape=()) for u in scan.units}
    result = normalize_within_(model, scan, list(x.chunk(batches)), records,
                               targets={u.name for u in scan.units})
    assert result.passes >= 1
    return {k: v.clone() for k, v in model.state_dict().items()}, served


def _same(a: dict, b: dict) -> None:
    for k in a:
        if a[k].is_floating_point():
            scale = max(1.0, float(b[k].abs().max()))
            assert float((a[k] - b[k]).abs().max()) <= 1e-4 * scale, k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("channels_last", [False, True])
def test_fed_batchnorms_end_where_train_mode_batchnorm_ends(channels_last, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(12, 3, 32, 32)
    runs = []
    for shortcut in (True, False):
        torch.manual_seed(1)
        model = timm.create_model("resnet18", pretrained=False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        runs.append(_within(model, x, 3, shortcut, monkeypatch))
    (fast, served), (plain, none) = runs
    _same(fast, plain)  # weights, running means and variances, batch counts
    assert not none
    # every BatchNorm of resnet18 reads a conv's output directly: all 20, every batch
    assert len(set(served)) == 20 and len(served) % (20 * 3) == 0


@pytest.mark.parametrize("net,seed,served_expected", [
    (ActBeforeNorm, 2, {"bn2"}),  # bn1 is fed an activation (a new tensor)
    (InPlaceActBeforeNorm, 3, set()),  # bn1 is fed the conv's object, changed in place
])
def test_only_a_batchnorm_fed_the_corrected_tensor_itself_takes_the_shortcut(
        net, seed, served_expected, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    runs = []
    for shortcut in (True, False):
        torch.manual_seed(seed)
        runs.append(_within(net(), x, 2, shortcut, monkeypatch))
    (fast, served), (plain, _) = runs
    _same(fast, plain)
    assert set(served) == served_expected
