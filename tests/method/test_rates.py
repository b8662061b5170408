"""Change-rate estimates: reproducible, per slice, and the model is left alone."""

from __future__ import annotations

import timm
import torch

from ckptinit.method.rates import estimate_rates
from ckptinit.method.units import scan_units
from tests.conftest import smooth_images
from tests.method.nets import pretend_trained, rates


def test_estimates_are_reproducible_and_leave_the_model_alone():
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=5))
    x = smooth_images(8, 32)
    units = scan_units(model, x[:2]).units
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = estimate_rates(model, units, [x], draws=1, seed=5)
    b = estimate_rates(model, units, [x], draws=1, seed=5)
    c = estimate_rates(model, units, [x], draws=1, seed=6)
    assert all(a.rate(u.name) == b.rate(u.name) for u in units)
    assert any(a.rate(u.name) != c.rate(u.name) for u in units)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fused_qkv_gets_one_rate_per_slice_that_matches_an_independent_estimate():
    model = pretend_trained(timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
        depth=2))
    x = smooth_images(8, 32)
    units = scan_units(model, x[:2]).units
    est = estimate_rates(model, units, [x], draws=24, seed=0,
                         slices={"blocks.0.attn.qkv": 3})
    q, k, v = est.slice_rates("blocks.0.attn.qkv")
    ref = rates(model, x, draws=24)  # Gaussian g, its own code
    for name, got in (("q", q), ("k", k), ("v", v)):
        want = ref[f"blocks.0.attn.qkv[{name}]"]
        assert abs(got / want - 1) < 0.25, (name, got, want)
    # the slices are not one number: q/k and v differ on trained-looking weights
    assert max(q, k, v) / min(q, k, v) > 1.05


def test_the_noise_of_an_estimate_matches_the_scatter_of_independent_ones():
    """log_rate_noise, from one estimate's own draws, is the standard error that separate
    estimates (other images of the same kind, other seeds) actually show; the between
    step's guard leans on it."""
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=5))
    x = smooth_images(128, 32)
    units = scan_units(model, x[:2]).units
    ests = [estimate_rates(model, units, list(x[s * 32:(s + 1) * 32].split(8)), draws=4,
                           seed=s) for s in range(4)]
    ests += [estimate_rates(model, units, list(x[torch.randperm(128, generator=torch.Generator()
                                                                .manual_seed(s))[:32]].split(8)),
                            draws=4, seed=s) for s in range(4, 16)]
    said = ests[0].log_rate_noise()
    ratios = []
    for u in units:
        logs = torch.tensor([e.log_rates()[(u.name, 0)] for e in ests], dtype=torch.float64)
        ratios.append(float(logs.std()) / said[(u.name, 0)])
    ratios.sort()
    median = ratios[len(ratios) // 2]
    assert 0.5 < median < 2.0, ratios
    assert estimate_rates(model, units, [x[:8]], draws=1, seed=0).log_rate_noise() == {}
