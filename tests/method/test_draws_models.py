"""`--weights pca|kmeans` through `rescale` on whole timm models (the unit-level properties of
the draws are in test_draws.py): depthwise nets, determinism of the model, decorrelation of
the first conv on held-out inputs, no duplicate k-means filters anywhere in a network."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ckptinit.api import rescale
from ckptinit.options import RescaleOptions
from tests.conftest import smooth_images

DATA_DRAWS = ("pca", "kmeans")


def fresh(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10)


def within(weights: str, seed: int = 0, **kw) -> RescaleOptions:
    return RescaleOptions(between=False, weights=weights, seed=seed, **kw)


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def conv1_corr(model: nn.Module, x: torch.Tensor) -> float:
    """Mean |off-diagonal correlation| of conv1's output channels (pooled over batch and
    positions), eval mode."""
    out = {}
    h = model.conv1.register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
    eval_out(model, x)
    h.remove()
    y = out["y"]
    z = y.transpose(0, 1).reshape(y.shape[1], -1).double()
    c = torch.corrcoef(z)
    return float(c[~torch.eye(len(c), dtype=torch.bool)].abs().mean())


def group_max_cos(m: nn.Conv2d) -> float | None:
    """Largest cosine similarity between two filters of the same group (None: one per group)."""
    w = m.weight.detach().double()
    per = w.shape[0] // m.groups
    if per < 2:
        return None
    u = F.normalize(w.reshape(m.groups, per, -1), dim=-1)
    cos = u @ u.transpose(1, 2) - 3 * torch.eye(per, dtype=u.dtype)
    return float(cos.max())


@pytest.mark.parametrize("method", DATA_DRAWS)
def test_depthwise_net(method):
    """mobilenetv3 (depthwise 3x3 and 5x5, squeeze-excite 1x1 on pooled input, hard-swish):
    the depthwise convs get the data draw, outputs are finite, fallbacks say why."""
    model = fresh("mobilenetv3_small_100")
    x, held = smooth_images(24, 32, seed=1), smooth_images(8, 32, seed=2)
    model, report = rescale(model, x, within(method))
    assert torch.isfinite(eval_out(model, held)).all()
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert len(depthwise) >= 10
    records = {r.name: r for r in report.units}
    assert all(records[n].draw == method for n in depthwise), {
        n: (records[n].draw, records[n].draw_reason) for n in depthwise}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # a fallback is a gaussian draw with its reason, never a silent one
    for r in report.units:
        if r.status == "fallback":
            assert r.draw == "gaussian" and r.draw_reason


@pytest.mark.parametrize("method", DATA_DRAWS)
def test_same_seed_identical_model(method):
    x = smooth_images(16, 32, seed=3)
    states = []
    for seed in (5, 5, 6):
        model, _ = rescale(fresh("test_resnet"), x, within(method, seed=seed))
        states.append(model.state_dict())
    same, other = states[:2], states[2]
    assert same[0].keys() == same[1].keys()
    for k in same[0]:
        assert same[0][k].dtype == same[1][k].dtype
        assert torch.equal(same[0][k], same[1][k]), k
    if method == "kmeans":  # the seed matters (pca is a function of the data alone here)
        assert not torch.equal(same[0]["conv1.0.weight"], other["conv1.0.weight"])


def test_pca_decorrelates_first_conv_on_held_out_images():
    x, held = smooth_images(16, 32, seed=4), smooth_images(16, 32, seed=5)
    corr = {}
    for method in ("gaussian", "pca"):
        model, report = rescale(fresh("resnet18"), x, within(method))
        assert report.unit("conv1").draw == method
        corr[method] = conv1_corr(model, held)
    assert corr["gaussian"] > 0.15, corr
    assert corr["pca"] < corr["gaussian"] / 4, corr


def test_kmeans_filters_are_distinct_in_every_conv():
    x = smooth_images(16, 32, seed=6)
    model, report = rescale(fresh("resnet18"), x, within("kmeans"))
    drawn = {r.name for r in report.units if r.draw == "kmeans"}
    assert {"conv1", "layer1.0.conv1", "layer2.0.conv1"} <= drawn
    cos = {n: group_max_cos(m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert max(cos.values()) < 0.99, sorted(cos.items(), key=lambda kv: -kv[1])[:3]
