"""Change-rate estimates: reproducible, and the model is left alone."""

from __future__ import annotations

import torch

from ckptinit.method.rates import estimate_rates
from tests.method.nets import _bn_setup


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
