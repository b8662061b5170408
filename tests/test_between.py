"""Between-layer step: equal change rates, the same function, and the right direction."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import smooth_images
from torch import nn

from ckptinit.api import measure, rescale
from ckptinit.errors import FunctionChangedError
from ckptinit.method.between import rescale_between_
from ckptinit.method.moves import plan_moves
from ckptinit.method.rates import estimate_rates
from ckptinit.method.trace import trace_followers
from ckptinit.method.units import scan_units
from ckptinit.options import RescaleOptions
from ckptinit.report import UnitRecord

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


@pytest.mark.parametrize("name,kwargs,size", [
    ("resnet18", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("convnext_atto", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32),
])
def test_loaded_weights_function_preserved_and_spread_shrinks(name, kwargs, size):
    torch.manual_seed(0)
    model = pretend_trained(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    x = smooth_images(40, size, seed=2)
    y0 = outputs(model, x[32:])
    model, report = rescale(model, x[:32], RescaleOptions(**LOADED, batch_size=32, iters=4),
                            fresh=(),
                            holdout=x[32:])
    y1 = outputs(model, x[32:])
    rel = ((y1 - y0).norm() / y0.norm()).item()
    assert rel <= 1e-4
    assert report.function_check.enforced and report.function_check.rel_change <= 1e-4
    assert spread(report, "after") < spread(report, "before")
    pinned = [u for u in report.units if u.between_status == "pinned"]
    assert all(u.between_reason for u in pinned)
    moved = [u for u in report.units if u.between_status in ("ok", "not converged")]
    assert moved, "nothing was allowed to move"


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


def test_fresh_resnet_rates_agree_within_tolerance():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x = smooth_images(40, 32, seed=3)
    _, report = rescale(model, x[:32], RescaleOptions(batch_size=32), holdout=x[32:])
    assert report.converged
    with_grad = [u for u in report.units if u.between_status == "ok"]
    assert len(with_grad) >= 5
    rates = [u.rate_after for u in with_grad]
    assert max(rates) / min(rates) <= 1.01 + 1e-6
    assert spread(report, "before") > 2


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


def test_plain_chain_equal_rates_output_unchanged():
    torch.manual_seed(0)
    model = PlainNet()
    with torch.no_grad():  # uneven scales, as trained weights would have
        for i, m in enumerate([model.c1, model.c2, model.c3, model.f1, model.f2]):
            m.weight.mul_(3.0 ** (i - 2))
    x = smooth_images(40, 16)
    y0 = outputs(model, x[32:])
    _, report = rescale(model, x[:32], RescaleOptions(**LOADED), fresh=(), holdout=x[32:])
    assert {u.compensation for u in report.units[:-1]} == {"chain of 5, scales multiply to 1"}
    assert report.converged and report.between_iterations <= 10
    rates = [u.rate_after for u in report.units]
    assert max(rates) / min(rates) <= 1.01 + 1e-6
    assert spread(report, "before") > 10
    y1 = outputs(model, x[32:])
    assert ((y1 - y0).norm() / y0.norm()).item() < 1e-5
    assert math.prod(u.r for u in report.units) == pytest.approx(1.0, rel=1e-6)


def _bn_setup():
    torch.manual_seed(0)
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=10))
    x = smooth_images(24, 32)
    scan = scan_units(model, x[:2])
    followers = trace_followers(model, x[:2], scan.units)
    plan = plan_moves(model, scan.units, followers, fresh=set())
    records = {u.name: UnitRecord(u.name, u.kind, u.shape) for u in scan.units}
    return model, x, plan, records


def test_inverted_update_diverges():
    """r = (C / Cbar)^(alpha/2) converges; the inverted ratio printed in some write-ups
    drives the rates apart. damping = -1 is exactly that inverted update."""
    spreads = {}
    for alpha in (1.0, -1.0):
        model, x, plan, records = _bn_setup()
        rescale_between_(model, plan, [x[:16]], [x[16:]], records, damping=alpha, iters=3,
                         grad_batches=1, function_tol=math.inf)
        rates = [r.rate_after for r in records.values() if r.between_status != "pinned"]
        before = [r.rate_before for r in records.values() if r.between_status != "pinned"]
        spreads[alpha] = (max(before) / min(before), max(rates) / min(rates))
    (b_ok, a_ok), (b_inv, a_inv) = spreads[1.0], spreads[-1.0]
    assert a_ok < 1.02 < b_ok
    assert a_inv > 10 * b_inv  # the wrong sign multiplies the spread


def test_estimates_are_reproducible_and_leave_the_model_alone():
    model, x, plan, _ = _bn_setup()
    units = [u for g in plan.groups for u in g.units]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = estimate_rates(model, units, [x], draws=1, seed=5)
    b = estimate_rates(model, units, [x], draws=1, seed=5)
    c = estimate_rates(model, units, [x], draws=1, seed=6)
    assert all(a.rate(u.name) == b.rate(u.name) for u in units)
    assert any(a.rate(u.name) != c.rate(u.name) for u in units)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_function_change_refused_beyond_tolerance(monkeypatch):
    import ckptinit.method.moves as moves

    def sabotage(model, group, scales):  # a move that forgets to compensate
        for u, r in zip(group.units, scales):
            u.module.weight.mul_(r)

    monkeypatch.setattr(moves, "apply_chain_", sabotage)
    model, x, plan, records = _bn_setup()
    with pytest.raises(FunctionChangedError, match="tolerance"):
        rescale_between_(model, plan, [x[:16]], [x[16:]], records, grad_batches=1)


def test_measure_changes_nothing_and_reports_rates():
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = measure(model, smooth_images(8, 32), RescaleOptions(grad_batches=1))
    assert all(u.rate_before and u.rate_before > 0 for u in report.units)
    assert all(u.std_before is not None for u in report.units)
    assert report.unit("fc").between_status == "pinned"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
