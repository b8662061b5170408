"""Streaming per-channel moments: float64 sums, so batches merge exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Per-channel count, sum and sum of squares of a (channels, samples) tensor."""

    count: float
    total: torch.Tensor
    total_sq: torch.Tensor

    @classmethod
    def of(cls, z: torch.Tensor, channel_dim: int) -> Moments:
        """Moments of each channel of z, pooled over every other dimension.

        var_mean reduces in place (no channel-first copy) with a stable float32 algorithm;
        only the per-channel results are kept in float64 for merging.
        """
        dims = tuple(d for d in range(z.dim()) if d != channel_dim % z.dim())
        var, mean = torch.var_mean(z.detach().float(), dim=dims, unbiased=False)
        n = float(z.numel() // z.shape[channel_dim])
        mean, var = mean.double(), var.double()
        return cls(n, n * mean, n * (var + mean * mean))

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq
        )

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def std(self) -> torch.Tensor:
        """Population std (ddof 0), as in the reference code; never NaN."""
        var = self.total_sq / self.count - self.mean**2
        return var.clamp_min(0).sqrt()

    def affine(self, scale: torch.Tensor, shift: torch.Tensor) -> Moments:
        """The moments of s * z + t, given those of z (exact)."""
        n, mean, sq = self.count, self.mean, self.total_sq / self.count
        new_sq = scale**2 * sq + 2 * scale * shift * mean + shift**2
        return Moments(n, n * (scale * mean + shift), n * new_sq)
