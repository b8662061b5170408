"""Streaming moments (method/stats.py): every layout of a conv output gives the float64
statistics, and channels-last outputs take the fast row-block path, not the strided one."""

from __future__ import annotations

import pytest
import torch

from ckptinit.method import stats
from ckptinit.method.stats import Moments


def _reference(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.double()
    return z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)


@pytest.mark.parametrize("shape", [(4, 3, 9, 7), (3, 80, 5, 5), (2, 7, 1, 1), (5, 300, 3, 2)])
def test_channels_last_moments_equal_the_float64_ones(shape, monkeypatch):
    monkeypatch.setattr(stats, "_BLOCK", 64)  # many blocks, a short last one
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g) * torch.rand(shape[1], 1, 1, generator=g) * 3 + 0.5
    cl = z.contiguous(memory_format=torch.channels_last)
    mean, var = _reference(z)
    for t in (z, cl):
        m = Moments.of(t, 1)
        assert m.count == z.numel() // shape[1]
        torch.testing.assert_close(m.mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.std ** 2, var, rtol=1e-4, atol=1e-6)
    a, b = Moments.of(z, 1), Moments.of(cl, 1)
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.total_sq, b.total_sq, rtol=1e-5, atol=1e-4)


def test_channels_last_outputs_use_the_row_blocks(monkeypatch):
    calls = []
    real = stats._channels_last_sums
    monkeypatch.setattr(stats, "_channels_last_sums", lambda z: calls.append(z) or real(z))
    z = torch.randn(2, 8, 6, 6)
    Moments.of(z, 1)
    assert not calls
    Moments.of(z.contiguous(memory_format=torch.channels_last), 1)
    assert len(calls) == 1


def test_a_mean_far_above_the_std_is_still_exact_channels_last():
    z = (torch.randn(4, 5, 8, 8) * 1e-3 + 1e3).contiguous(memory_format=torch.channels_last)
    mean, var = _reference(z)
    m = Moments.of(z, 1)
    torch.testing.assert_close(m.std ** 2, var, rtol=1e-2, atol=0)
    torch.testing.assert_close(m.mean, mean, rtol=1e-6, atol=0)
