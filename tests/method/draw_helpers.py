"""Shared by the draw tests: generators, smooth inputs, filter and output similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DATA_DRAWS = ("pca", "kmeans")


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def smooth_noise(n: int, c: int, size: int, seed: int, width: float = 1.5) -> torch.Tensor:
    """Gaussian-blurred noise images: neighbouring pixels strongly correlated, like photos."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size + 8, size + 8, generator=g)
    t = torch.arange(-4, 5, dtype=torch.float32)
    k1 = torch.exp(-(t**2) / (2 * width**2))
    k2 = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
    return F.conv2d(x, k2.expand(c, 1, 9, 9), groups=c)


def rows_of(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).double()


def max_offdiag_cos(w: torch.Tensor) -> float:
    u = F.normalize(rows_of(w), dim=1)
    cos = u @ u.T
    cos.fill_diagonal_(-1)
    return float(cos.max())


def mean_abs_offdiag_corr(y: torch.Tensor) -> float:
    """y: (N, C, ...) outputs; channel correlation pooled over batch and positions."""
    z = y.detach().transpose(0, 1).reshape(y.shape[1], -1).double()
    c = torch.corrcoef(z)
    off = c[~torch.eye(len(c), dtype=torch.bool)]
    return float(off.abs().mean())
