"""The dry run's estimates against what a real run does: passes counted by hooks, memory
against the tensors a forward really makes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ckptinit.api import rescale
from ckptinit.method.cost import measure_footprint
from ckptinit.method.dry_run import dry_run
from ckptinit.method.units import scan_units
from ckptinit.options import RescaleOptions
from tests.conftest import smooth_images


def counted_run(model: nn.Module, images: torch.Tensor, options: RescaleOptions,
                monkeypatch, holdout: torch.Tensor | None = None) -> tuple[int, int]:
    """Calls of the model's forward (its float64 copies included: hooks are copied) and of
    autograd's backward during one real `rescale`."""
    calls = {"forward": 0, "backward": 0}
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__("forward",
                                                                   calls["forward"] + 1))
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["backward"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    rescale(model, images, options, holdout=holdout)
    monkeypatch.undo()
    return calls["forward"], calls["backward"]


NETS = {
    "test_resnet": ({}, {}),
    "test_vit": ({"img_size": 32}, {}),  # fresh GELU pairs: re-normalised every iteration
    # squeeze-excite gates released: traced twice, BatchNorm re-estimated
    "test_efficientnet": ({}, {"allow_function_change": True}),
}


@pytest.mark.parametrize("arch", list(NETS))
def test_estimated_passes_bound_a_real_run(arch, monkeypatch):
    model_args, extra = NETS[arch]
    model = timm.create_model(arch, pretrained=False, **model_args)
    images = smooth_images(8, 32)
    options = RescaleOptions(batch_size=4, grad_batches=1, iters=2, device="cpu", **extra)
    plan = dry_run(model, (3, 32, 32), options, images=8, holdout=0)
    forwards, backwards = counted_run(model, images, options, monkeypatch)
    assert 0 < forwards <= plan.forwards
    assert 0 < backwards <= plan.backwards
    assert any(p.bound for p in plan.passes)  # two batches: the within-layer passes may stop


def test_estimated_passes_are_exact_for_one_batch_and_no_iteration(monkeypatch):
    model = timm.create_model("test_resnet", pretrained=False)
    images = smooth_images(6, 32)
    options = RescaleOptions(batch_size=8, grad_batches=2, iters=0, device="cpu")
    plan = dry_run(model, (3, 32, 32), options, images=6, holdout=0)
    assert not any(p.bound for p in plan.passes)
    assert counted_run(model, images, options, monkeypatch) == (plan.forwards, plan.backwards)


def test_estimated_passes_are_exact_with_held_out_images(monkeypatch):
    """Held-out images add the change rates re-measured on them (and the checks' passes)."""
    model = timm.create_model("test_resnet", pretrained=False)
    images, holdout = smooth_images(6, 32), smooth_images(4, 32, seed=1)
    options = RescaleOptions(batch_size=8, grad_batches=2, iters=0, device="cpu")
    plan = dry_run(model, (3, 32, 32), options, images=6, holdout=4)
    assert any(p.stage == "change rates on the held-out images" for p in plan.passes)
    assert counted_run(model, images, options, monkeypatch, holdout) == (plan.forwards,
                                                                        plan.backwards)


def test_footprint_counts_at_least_what_the_modules_output_and_scales_with_the_batch():
    model = timm.create_model("test_resnet", pretrained=False)
    units = scan_units(model, torch.randn(2, 3, 32, 32)).units
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    handles = [m.register_forward_hook(lambda m, a, y: outputs.append(y.numel() * 4))
               for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    fp4 = measure_footprint(model, units, x)
    fp2 = measure_footprint(model, units, x[:2])
    leaf_per_image = sum(outputs) / 4
    assert fp4.produced >= 0.5 * leaf_per_image  # in-place ReLUs make no new tensor
    assert fp4.produced >= max(outputs) / 4
    assert fp4.produced == pytest.approx(fp2.produced, rel=0.05)
    assert 0 < fp4.saved <= fp4.produced + fp4.input
    assert fp4.rows["conv1.0"] == 16 * 16  # stride 2 on 32 px: output positions per image
    # timm zero-initialises each block's last BatchNorm: those branches get no gradient
    assert "layer1.0.conv1" in fp4.zero_grad and "fc" not in fp4.zero_grad
