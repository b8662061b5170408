"""The scale graph: every move it allows leaves the function unchanged, and what it pins."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from ckptinit.method.moves import apply_scales_, plan_moves
from ckptinit.method.units import called_units, scan_units
from tests.method.nets import PlainNet, outputs, pretend_trained, rel_change


def _exact(model: nn.Module) -> nn.Module:
    """float64, and norms whose eps cannot show (eps is the one approximation of a move)."""
    model = model.double()
    for m in model.modules():
        if isinstance(getattr(m, "eps", None), float):
            # batch_norm in training (timm's ScaledStdConv standardises its weight with it)
            # needs a positive eps
            m.eps = 1e-300 if isinstance(m, nn.modules.batchnorm._BatchNorm) \
                or "StdConv" in type(m).__name__ else 0.0
    return model


def random_moves_keep_outputs(model: nn.Module, size: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    scan = scan_units(model, x[:2])
    plan = plan_moves(model, scan.units, x, fresh=set())
    moved = copy.deepcopy(model)
    z = plan.basis @ torch.randn(plan.basis.shape[1], dtype=torch.float64) * 0.5
    assert float(z.abs().max()) > 0.1  # the moves are real, not a null vector
    apply_scales_(moved, plan, z)
    return rel_change(outputs(moved, x), outputs(model, x))


@pytest.mark.parametrize("name,kwargs", [
    ("test_resnet", {}),
    ("test_efficientnet", {}),
    ("test_convnext", {}),
    ("test_vit", {"img_size": 32}),
    ("test_vit_relpos", {"img_size": 32}),
    ("test_nfnet", {}),  # a norm's affine weight computed in forward (gain * scale)
])
def test_allowed_moves_preserve_the_function(name, kwargs):
    model = _exact(timm.create_model(name, pretrained=False, **kwargs))
    # BatchNorm in eval mode with running statistics that the moves must follow
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    assert random_moves_keep_outputs(model, 32) < 1e-10


def test_eva_moves_slice_by_slice_and_keeps_the_function():
    """q/v biases concatenated with a zero k buffer, RoPE's type_as, SwiGLU: q/k balanced,
    v against proj, each slice with its own bias, and every allowed move exact."""
    model = _exact(pretend_trained(timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=32, patch_size=8, depth=2)))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with called_units(model):
        assert random_moves_keep_outputs(model, 32) < 1e-10
        plan = plan_moves(model, scan_units(model, x).units, x, fresh=set())
    qkv = [u.name for u in plan.units if u.name.endswith("attn.qkv")]
    assert len(qkv) == 2 and all(plan.slices[n] == 3 for n in qkv)
    assert all(((n, 0), (n, 1)) in plan.pairs and plan.movable((n, 2)) for n in qkv)
    assert not plan.pinned
    for n in qkv:  # q, k, v and proj move independently (with the stream and norm1's weight)
        rows = [plan.var((n, s)) for s in range(3)] + [plan.var((n[:-3] + "proj", 0))]
        assert int(torch.linalg.matrix_rank(plan.basis[rows], atol=1e-8)) == 4


def test_plain_chain_moves_keep_the_product_of_scales():
    model = _exact(PlainNet())
    assert random_moves_keep_outputs(model, 16) < 1e-10


def test_vit_q_k_v_are_slices_and_the_head_moves_through_the_final_norm():
    model = pretend_trained(timm.create_model("test_vit", pretrained=False, img_size=32))
    x = torch.randn(2, 3, 32, 32)
    plan = plan_moves(model, scan_units(model, x).units, x, fresh=set())
    qkv = [u.name for u in plan.units if u.name.endswith("attn.qkv")]
    assert qkv and all(plan.slices[n] == 3 for n in qkv)
    assert all(((n, 0), (n, 1)) in plan.pairs for n in qkv)  # q and k: balanced only
    assert not plan.pinned
    assert "norm" in plan.compensation["head"]


def test_squeeze_excite_and_the_head_after_an_activation_are_pinned_with_reasons():
    model = timm.create_model("test_efficientnet", pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    plan = plan_moves(model, scan_units(model, x).units, x, fresh=set())
    pinned = {k[0]: why for k, why in plan.pinned.items()}
    assert any(".se." in n for n in pinned)
    assert "classifier" in pinned
    assert all(why for why in pinned.values())
    assert "model output" in pinned["classifier"]
    assert not any(n.endswith(("conv_dw", "conv_pw", "conv_pwl")) for n in pinned)


class ExpScale(nn.Module):
    """y = fc2(relu(fc1(x)) * exp(log_g)): a multiplier reached through a non-linear map of
    its parameter cannot absorb a scale by dividing it (today's bug 6)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.log_g = nn.Parameter(torch.randn(16) * 0.3)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) * self.log_g.exp())


def test_multiplier_through_exp_is_not_a_layerscale():
    model = ExpScale().double()
    x = torch.randn(32, 8, dtype=torch.float64)
    plan = plan_moves(model, scan_units(model, x[:2]).units, x, fresh=set())
    assert ("log_g", 0) not in plan.graph.param_var or all(
        float(plan.basis[v].abs().max()) < 1e-9 for (n, _), v in plan.graph.param_var.items()
        if n == "log_g")
    moved = copy.deepcopy(model)
    z = plan.basis @ torch.randn(plan.basis.shape[1], dtype=torch.float64)
    apply_scales_(moved, plan, z)
    assert rel_change(moved(x), model(x)) < 1e-12
    assert torch.equal(moved.log_g, model.log_g)


class Recurrent(nn.Module):
    """A unit whose first call feeds its own second call (today's bug 5: plan_moves never
    returned, memory grew without bound)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.head(x.mean((2, 3)))


def test_unit_feeding_its_own_second_call_plans_and_preserves():
    model = _exact(Recurrent())
    assert random_moves_keep_outputs(model, 16) < 1e-10
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plan = plan_moves(model, scan_units(model, x).units, x, fresh=set())
    # shared's output scale must equal its input's (it reads itself): with the head at the
    # output and the stem free, a ReLU chain in a loop still moves
    assert math.isfinite(float(plan.basis.abs().sum()))
