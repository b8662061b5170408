"""Patches (what a unit's filters see) and their whitening: exact gathers, eigen paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptinit.method import patches
from ckptinit.method.draws import draw_weight_
from tests.method.draw_helpers import (
    gen,
)


def _conv_cases():
    return [
        nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        nn.Conv2d(6, 4, 4, padding="same", dilation=2),
        nn.Conv2d(6, 4, 4, padding="same"),  # odd total padding: the extra pixel at the end
        nn.Conv2d(6, 4, 3, padding="valid"),
        nn.Conv2d(6, 4, 3, padding=2, padding_mode="reflect"),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular", groups=6),
        nn.Conv1d(6, 6, 2, padding="same", groups=3),
        nn.Conv3d(6, 4, (2, 3, 3), stride=(1, 2, 1), padding=1, padding_mode="replicate"),
        nn.Conv2d(6, 8, 1, stride=2),
    ]


def _predict(conv: nn.Module, found) -> torch.Tensor:
    """The unit's output at the gathered positions, from the rows (tap-major columns)."""
    g = conv.groups
    w = conv.weight.detach().reshape(g, conv.out_channels // g, -1, found.taps)
    w = w.transpose(2, 3).reshape(g, conv.out_channels // g, -1)
    out = torch.bmm(found.rows, w.transpose(1, 2))  # (groups, n, k)
    return out.transpose(0, 1).reshape(found.rows.shape[1], -1)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("budget", [10**6, 37])
@pytest.mark.parametrize("case", range(9))
def test_patches_are_what_the_conv_sees(case, budget):
    """Each patch row, dotted with the unit's filters, gives the unit's output at its position."""
    conv = _conv_cases()[case]
    x = torch.randn(3, 6, *([9] * len(conv.kernel_size)))
    found = patches.extract_patches(conv, x, budget, gen())
    with torch.no_grad():
        y = conv._conv_forward(x, conv.weight, None)
    yf = y.movedim(1, -1).reshape(-1, conv.out_channels)
    assert found.total == len(yf)
    if budget < found.total:
        idx = found.positions
        assert idx is not None and len(idx) == budget and len(set(idx.tolist())) == budget
        yf = yf[idx]
    else:
        assert found.positions is None
    assert torch.allclose(_predict(conv, found), yf, atol=1e-5)


def test_patches_channels_last_and_unbatched_input():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 7, 7)
    ref = patches.extract_patches(conv, x, 10**6, gen()).rows
    cl = patches.extract_patches(conv, x.to(memory_format=torch.channels_last), 10**6, gen()).rows
    assert torch.equal(cl, ref)
    single = patches.extract_patches(conv, x[0], 10**6, gen()).rows
    assert torch.equal(single, ref[:, : single.shape[1]])


@pytest.mark.parametrize("stride", [1, 2])
def test_patches_timm_conv2d_same(stride):
    layers = pytest.importorskip("timm.layers")
    conv = layers.Conv2dSame(3, 4, 3, stride=stride)
    x = torch.randn(2, 3, 10, 9)
    found = patches.extract_patches(conv, x, 10**6, gen())
    with torch.no_grad():
        y = conv(x) - conv.bias.view(1, -1, 1, 1)
    yf = y.movedim(1, -1).reshape(-1, 4)
    assert found.total == len(yf)
    assert torch.allclose(_predict(conv, found), yf, atol=1e-5)


def test_linear_rows_subsampled_to_budget():
    unit = nn.Linear(8, 4)
    x = torch.randn(5, 40, 8)
    found = patches.extract_patches(unit, x, 64, gen())
    assert found.total == 200 and found.rows.shape == (1, 64, 8)
    assert torch.equal(found.rows[0], x.reshape(-1, 8)[found.positions])
    res = draw_weight_(unit, x, "pca", gen(), patch_budget=64)
    assert res.samples == 64


def test_randomized_eigen_matches_full(monkeypatch):
    """The subspace iteration used for wide inputs finds the top directions of a decaying
    spectrum, and its PCA filters decorrelate the patches exactly."""
    g = torch.Generator().manual_seed(11)
    dim, k = 96, 8
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    spectrum = 0.7 ** torch.arange(dim, dtype=torch.float32)
    x = torch.randn(2000, dim, generator=g) * spectrum.sqrt() @ basis.T
    p = x.unsqueeze(0)
    cov = patches._gram(p - p.mean(1, keepdim=True)) / len(x)
    lam_full, vec_full = patches._top_eigen(cov, k, gen())
    monkeypatch.setattr(patches, "RANDOMIZED_MIN_DIM", 16)
    lam_rand, vec_rand = patches._top_eigen(cov, k, gen())
    assert torch.allclose(lam_rand, lam_full, rtol=1e-3)
    overlap = (vec_rand[0].T @ vec_full[0]).abs().diagonal()
    assert (overlap > 0.99).all()
    unit = nn.Linear(dim, k, bias=False)
    draw_weight_(unit, x, "pca", gen())
    with torch.no_grad():
        y = unit(x)
    c = torch.corrcoef(y.T.double())
    assert (c - torch.eye(k, dtype=c.dtype)).abs().max() < 1e-3


def test_gram_blocked_matches_plain(monkeypatch):
    monkeypatch.setattr(patches, "_GRAM_BLOCK", 8)
    x = torch.randn(2, 50, 37)
    ref = torch.bmm(x.transpose(1, 2), x)
    got = patches._gram(x)
    assert torch.allclose(got, ref, atol=1e-4) and torch.equal(got, got.transpose(1, 2))
