"""Between-layer step: equal change rates, the same function, and the right direction."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from ckptinit.api import rescale
from ckptinit.errors import FunctionChangedError
from ckptinit.method.between import rescale_between_
from ckptinit.options import RescaleOptions
from tests.conftest import smooth_images
from tests.method.nets import LOADED, PlainNet, _bn_setup, outputs, pretend_trained, spread


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


def test_function_change_refused_beyond_tolerance(monkeypatch):
    import ckptinit.method.moves as moves

    def sabotage(model, group, scales):  # a move that forgets to compensate
        for u, r in zip(group.units, scales):
            u.module.weight.mul_(r)

    monkeypatch.setattr(moves, "apply_chain_", sabotage)
    model, x, plan, records = _bn_setup()
    with pytest.raises(FunctionChangedError, match="tolerance"):
        rescale_between_(model, plan, [x[:16]], [x[16:]], records, grad_batches=1)
