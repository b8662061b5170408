"""Weight draws (draws.py): shapes, determinism, groups, decorrelation, k-means, fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptinit.errors import UsageError
from ckptinit.method import draws
from ckptinit.method.draws import DrawResult, draw_weight_
from tests.method.draw_helpers import (
    DATA_DRAWS,
    DEVICES,
    gen,
    max_offdiag_cos,
    mean_abs_offdiag_corr,
    rows_of,
    smooth_noise,
)

UNITS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 10, 10)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (3, 4, 11, 11)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (3, 4, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding="same"), (4, 3, 20)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (2, 2, 3, 6, 6)),
    "linear_tokens": (lambda: nn.Linear(8, 6), (4, 10, 8)),
}


@pytest.mark.parametrize("method", ["gaussian", "orthogonal", "pca", "kmeans", "keep"])
@pytest.mark.parametrize("name", sorted(UNITS))
def test_shape_dtype_bias_preserved(name, method):
    make, shape = UNITS[name]
    unit = make()
    x = torch.randn(shape)
    before_w, before_b = unit.weight.detach().clone(), unit.bias.detach().clone()
    res = draw_weight_(unit, x, method, gen())
    assert isinstance(res, DrawResult) and res.requested == method
    assert res.method == method, res.reason
    assert unit.weight.shape == before_w.shape and unit.weight.dtype == before_w.dtype
    assert torch.equal(unit.bias, before_b)
    assert torch.isfinite(unit.weight).all()
    assert torch.equal(unit.weight, before_w) == (method == "keep")
    if method in DATA_DRAWS:
        assert res.samples > 0
    assert set(res.to_dict()) == {"method", "requested", "reason", "samples", "iterations"}


@pytest.mark.parametrize("method", DATA_DRAWS)
def test_half_precision_weight_and_input(method):
    unit = nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    res = draw_weight_(unit, x, method, gen())
    assert res.method == method
    assert unit.weight.dtype == torch.bfloat16 and torch.isfinite(unit.weight.float()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gaussian", "orthogonal", "pca", "kmeans"])
def test_same_seed_same_bytes(method, device):
    x = smooth_noise(6, 3, 16, seed=1).to(device)
    weights = []
    for _ in range(2):
        unit = nn.Conv2d(3, 8, 3, padding=1).to(device)
        draw_weight_(unit, x, method, gen(5, device), patch_budget=300)  # subsampled path
        weights.append(unit.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    unit = nn.Conv2d(3, 8, 3, padding=1).to(device)
    draw_weight_(unit, x, method, gen(6, device), patch_budget=300)
    assert not torch.equal(unit.weight, weights[0])  # another seed: another subsample


def test_unknown_method_and_bad_budget():
    unit = nn.Linear(4, 2)
    with pytest.raises(UsageError):
        draw_weight_(unit, torch.randn(8, 4), "zca", gen())
    with pytest.raises(UsageError):
        draw_weight_(unit, torch.randn(8, 4), "pca", gen(), patch_budget=0)


@pytest.mark.parametrize("shape", [(4, 27), (27, 4), (6, 6)])
def test_orthogonal_per_group(shape):
    k, dim = shape
    unit = nn.Conv2d(3 * 2, k * 2, 3, groups=2) if dim == 27 else nn.Linear(dim, k)
    draw_weight_(unit, torch.randn(2, 6, 5, 5) if dim == 27 else torch.randn(3, dim),
                 "orthogonal", gen())
    groups = 2 if dim == 27 else 1
    for w in rows_of(unit.weight).reshape(groups, k, -1):
        gram = w @ w.T if k <= w.shape[1] else w.T @ w
        assert torch.allclose(gram, torch.eye(len(gram), dtype=gram.dtype), atol=1e-5)


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_pca_equals_separate_draws(groups):
    """Group g's filters depend only on group g's input channels (checked against a draw on
    that group's channels alone; PCA directions are defined up to sign)."""
    x = smooth_noise(4, 6, 12, seed=2) * torch.linspace(0.5, 3.0, 6).view(1, 6, 1, 1)
    out = 2 * groups
    unit = nn.Conv2d(6, out, 3, padding=1, groups=groups)
    draw_weight_(unit, x, "pca", gen())
    cg, kg = 6 // groups, out // groups
    for g in range(groups):
        alone = nn.Conv2d(cg, kg, 3, padding=1)
        draw_weight_(alone, x[:, g * cg : (g + 1) * cg], "pca", gen())
        a = F.normalize(rows_of(unit.weight[g * kg : (g + 1) * kg]), dim=1)
        b = F.normalize(rows_of(alone.weight), dim=1)
        assert torch.allclose((a * b).sum(1).abs(), torch.ones(kg, dtype=a.dtype), atol=1e-4)


@pytest.mark.parametrize("method", DATA_DRAWS)
def test_grouped_filters_follow_their_own_group(method):
    """Input group 0 varies along (1, 1), group 1 along (1, -1): each group's single filter
    must follow its own group's principal direction."""
    g = torch.Generator().manual_seed(3)
    s0, s1 = torch.randn(2, 500, generator=g) * torch.tensor([[1.0], [50.0]])
    n = torch.randn(4, 500, generator=g) * torch.tensor([[0.05], [0.05], [2.5], [2.5]])
    x = torch.stack([s0 + n[0], s0 + n[1], s1 + n[2], -s1 + n[3]]).view(1, 4, 1, 500)
    unit = nn.Conv2d(4, 2, 1, groups=2)
    res = draw_weight_(unit, x, method, gen())
    assert res.method == method
    w = F.normalize(rows_of(unit.weight), dim=1)
    assert abs(float(w[0] @ torch.tensor([1.0, 1.0], dtype=w.dtype))) / 2**0.5 > 0.99
    assert abs(float(w[1] @ torch.tensor([1.0, -1.0], dtype=w.dtype))) / 2**0.5 > 0.99


@pytest.mark.parametrize("method", DATA_DRAWS)
def test_depthwise_filters_per_channel(method):
    """Channel 0 is smooth along rows, channel 1 along columns: the depthwise filters differ
    accordingly (each is its own channel's top principal direction, in 3x3 form)."""
    base = smooth_noise(8, 1, 16, seed=4, width=0.3)
    horiz = F.avg_pool2d(F.pad(base, (2, 2, 0, 0), mode="circular"), (1, 5), stride=1)
    vert = F.avg_pool2d(F.pad(base, (0, 0, 2, 2), mode="circular"), (5, 1), stride=1)
    x = torch.cat([horiz, vert], dim=1)
    unit = nn.Conv2d(2, 2, 3, padding=1, groups=2)
    res = draw_weight_(unit, x, method, gen())
    assert res.method == method and unit.weight.shape == (2, 1, 3, 3)
    w = unit.weight.detach().abs()[:, 0]
    # the top direction of a row-smooth channel is a horizontal bar, and vice versa
    assert w[0].mean(1).std() > 2 * w[0].mean(0).std()
    assert w[1].mean(0).std() > 2 * w[1].mean(1).std()


def test_dead_group_gets_gaussian_others_data():
    x = smooth_noise(4, 4, 10, seed=5)
    x[:, 2:] = 0.7  # group 1 sees a constant input
    unit = nn.Conv2d(4, 4, 3, groups=2)
    res = draw_weight_(unit, x, "pca", gen())
    assert res.method == "pca" and "1 of 2 groups" in res.reason
    assert torch.isfinite(unit.weight).all() and (unit.weight[2:].abs().sum((1, 2, 3)) > 0).all()


def test_pca_decorrelates_held_out_outputs():
    train, held_out = smooth_noise(16, 3, 24, seed=6), smooth_noise(16, 3, 24, seed=7)
    train = train + 0.5 * train[:, :1]  # correlated channels too
    held_out = held_out + 0.5 * held_out[:, :1]
    corr = {}
    for method in ("gaussian", "pca"):
        unit = nn.Conv2d(3, 8, 3, bias=False)
        draw_weight_(unit, train, method, gen())
        with torch.no_grad():
            corr[method] = mean_abs_offdiag_corr(unit(held_out))
    assert corr["gaussian"] > 0.3
    assert corr["pca"] < 0.05
    assert corr["pca"] < corr["gaussian"] / 5


def test_pca_more_outputs_than_dimensions_fills_with_combinations():
    unit = nn.Conv2d(2, 8, 1)
    x = smooth_noise(4, 2, 8, seed=8)
    res = draw_weight_(unit, x, "pca", gen())
    assert res.method == "pca" and "random whitened combinations" in res.reason
    assert torch.isfinite(unit.weight).all()
    assert max_offdiag_cos(unit.weight) < 0.9999  # the fill is random, not copies


def test_pca_rank_deficient_input():
    """Inputs in a 3-dim subspace of 8: only 3 filters are principal directions, none of the
    others is a null direction (whose output would have zero variance)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(200, 3, generator=g) @ torch.randn(3, 8, generator=g)
    unit = nn.Linear(8, 6)
    res = draw_weight_(unit, x, "pca", gen())
    assert res.method == "pca" and res.reason.startswith("3 principal directions")
    with torch.no_grad():
        std = (x @ unit.weight.T).std(0)
    assert (std > 1e-3 * std.max()).all()


def test_draws_are_scale_invariant():
    """eps is relative to the mean eigenvalue: scaling the input only scales the filters."""
    x = smooth_noise(4, 3, 12, seed=10)
    for method in DATA_DRAWS:
        a, b = nn.Conv2d(3, 6, 3), nn.Conv2d(3, 6, 3)
        draw_weight_(a, x, method, gen())
        draw_weight_(b, 1000.0 * x, method, gen())
        na, nb = F.normalize(rows_of(a.weight), dim=1), F.normalize(rows_of(b.weight), dim=1)
        assert torch.allclose(na, nb, atol=1e-3), method


@pytest.mark.parametrize("spread", [0.05, 0.3])
def test_kmeans_no_duplicate_filters_on_few_modes(spread):
    """Three modes, twelve outputs: k-means itself finds twelve distinct centres."""
    g = torch.Generator().manual_seed(12)
    modes = torch.randn(3, 16, generator=g) * 3
    x = modes[torch.randint(0, 3, (600,), generator=g)] + spread * torch.randn(600, 16, generator=g)
    unit = nn.Linear(16, 12)
    res = draw_weight_(unit, x, "kmeans", gen())
    assert res.method == "kmeans" and res.reason is None and res.iterations >= 1
    assert torch.isfinite(unit.weight).all()
    assert max_offdiag_cos(unit.weight) < 0.99


def test_kmeans_tight_modes_redraws_coinciding_centres():
    """Modes so tight that their spread is below the rank cut: whitened, the data are three
    points; the centres that coincide are redrawn, and the reason says so."""
    g = torch.Generator().manual_seed(12)
    modes = torch.randn(3, 16, generator=g) * 3
    x = modes[torch.randint(0, 3, (600,), generator=g)] + 0.01 * torch.randn(600, 16, generator=g)
    unit = nn.Linear(16, 12)
    res = draw_weight_(unit, x, "kmeans", gen())
    assert res.method == "kmeans" and res.reason.startswith("9 of 12 k-means centres coincided")
    assert torch.isfinite(unit.weight).all()
    assert max_offdiag_cos(unit.weight) < 0.99


def test_kmeans_fewer_distinct_patches_than_outputs():
    """Only four distinct rows for eight outputs: the surplus centres coincide and are redrawn
    (said in the reason); still no duplicate, zero or NaN filter."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, 10, generator=g).repeat(50, 1)
    unit = nn.Linear(10, 8)
    res = draw_weight_(unit, x, "kmeans", gen())
    assert res.method == "kmeans" and "redrawn" in res.reason
    assert torch.isfinite(unit.weight).all() and (rows_of(unit.weight).norm(dim=1) > 0).all()
    assert max_offdiag_cos(unit.weight) < 0.99


def test_kmeans_empty_clusters_are_reseeded(monkeypatch):
    """Duplicated points make identical initial centres, hence empty clusters: they are moved
    to far points, and the centres end distinct, unit-norm and finite."""
    calls = []
    real = draws._reseed

    def spy(*args):
        calls.append(int(args[-1].sum()))
        return real(*args)

    monkeypatch.setattr(draws, "_reseed", spy)
    g = torch.Generator().manual_seed(14)
    distinct = F.normalize(torch.randn(8, 5, generator=g), dim=1)
    z = torch.cat([distinct[:2].repeat(100, 1), distinct[2:]]).unsqueeze(0)
    valid = torch.ones(z.shape[:2], dtype=torch.bool)
    centres, _ = draws._spherical_kmeans(z, valid, 8, gen(0))
    assert calls and sum(calls) > 0
    assert torch.isfinite(centres).all()
    assert torch.allclose(centres.norm(dim=-1), torch.ones(1, 8))
    cos = centres[0] @ centres[0].T
    cos.fill_diagonal_(-1)
    assert cos.max() < 0.999


def test_kmeans_centres_map_back_to_filters():
    """Four well-separated clusters, k = 4: each filter responds most to a different cluster,
    i.e. W_i . (x - mean) = c_i . whiten(x) puts the centres back in input space."""
    g = torch.Generator().manual_seed(15)
    means = torch.randn(4, 6, generator=g) * 5
    labels = torch.arange(400) % 4
    x = means[labels] + 0.3 * torch.randn(400, 6, generator=g)
    unit = nn.Linear(6, 4, bias=False)
    res = draw_weight_(unit, x, "kmeans", gen())
    assert res.method == "kmeans"
    with torch.no_grad():
        resp = (means - x.mean(0)) @ unit.weight.T  # (cluster, filter)
    assert sorted(resp.argmax(0).tolist()) == [0, 1, 2, 3]


def test_kmeans_more_outputs_than_dimensions():
    """A 1x1 conv widening 3 -> 12 channels: k-means in 3 whitened dims still gives 12
    distinct filters."""
    x = smooth_noise(4, 3, 12, seed=16) + torch.randn(4, 3, 12, 12) * 0.3
    unit = nn.Conv2d(3, 12, 1)
    res = draw_weight_(unit, x, "kmeans", gen())
    assert res.method == "kmeans" and torch.isfinite(unit.weight).all()
    assert max_offdiag_cos(unit.weight) < 0.99


@pytest.mark.parametrize("method", DATA_DRAWS)
def test_fewer_samples_than_outputs_falls_back(method):
    unit = nn.Linear(8, 1000)
    res = draw_weight_(unit, torch.randn(16, 8), method, gen())
    assert res.method == "gaussian" and res.requested == method
    assert res.reason == "fewer rows (16) than outputs (1000)"
    assert torch.isfinite(unit.weight).all() and unit.weight.std() > 0.5


def test_budget_below_outputs_says_so():
    unit = nn.Conv2d(3, 16, 3)
    res = draw_weight_(unit, torch.randn(2, 3, 8, 8), "pca", gen(), patch_budget=10)
    assert res.method == "gaussian" and res.reason == "patch budget (10) below outputs (16)"


@pytest.mark.parametrize(
    ("x", "why"),
    [
        (torch.full((4, 3, 8, 8), 2.0), "degenerate input"),
        (torch.full((4, 3, 8, 8), float("nan")), "non-finite input"),
        (torch.randn(4, 3, 2, 2), "input smaller than the kernel"),
    ],
)
def test_degenerate_inputs_fall_back(x, why):
    for method in DATA_DRAWS:
        unit = nn.Conv2d(3, 4, 3)
        res = draw_weight_(unit, x, method, gen())
        assert res.method == "gaussian" and why in res.reason
        assert torch.isfinite(unit.weight).all()


def test_unsupported_unit_falls_back():
    unit = nn.ConvTranspose2d(3, 4, 3)
    res = draw_weight_(unit, torch.randn(2, 3, 6, 6), "pca", gen())
    assert res.method == "gaussian" and "ConvTranspose2d" in res.reason
    assert draw_weight_(unit, torch.randn(2, 3, 6, 6), "orthogonal", gen()).method == "orthogonal"
