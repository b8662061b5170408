"""Relative change rates C = ||dL/dW|| / ||W|| under a label-free random linear loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .units import Unit, calibration_mode


def output_tensor(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        y = list(y.values())
    return next(t for t in y if isinstance(t, torch.Tensor))


@dataclass
class Rates:
    """Squared gradient norms (mean over draws) and squared weight norms per unit."""

    grad_sq: dict[str, torch.Tensor]  # per unit: tensor of per-slice values (1 or 3 slices)
    weight_sq: dict[str, torch.Tensor]

    def rate(self, name: str) -> float:
        g, w = float(self.grad_sq[name].sum()), float(self.weight_sq[name].sum())
        return math.sqrt(g / w) if w > 0 and math.isfinite(g) else float("nan")


def _slices(u: Unit, attention_units: set[str]) -> int:
    return 3 if u.name in attention_units else 1


def estimate_rates(
    model: nn.Module,
    units: list[Unit],
    batches: Sequence[torch.Tensor],
    draws: int,
    seed: int,
    attention_units: set[str] = frozenset(),
) -> Rates:
    """||dL/dW||^2 averaged over `draws` (batch, g) pairs; the same pairs for the same seed.

    BatchNorm runs on batch statistics, as in training; its running statistics are
    restored afterwards so that estimating never changes the model.
    """
    weights = [u.module.weight for u in units]
    device = weights[0].device
    acc = {u.name: torch.zeros(_slices(u, attention_units), dtype=torch.float64, device=device)
           for u in units}
    requires = [w.requires_grad for w in weights]
    try:
        with calibration_mode(model):
            for w in weights:
                w.requires_grad_(True)
            for j in range(draws):
                x = batches[j % len(batches)]
                y = output_tensor(model(x))
                gen = torch.Generator(device=y.device).manual_seed(seed * 1000003 + j)
                g = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
                grads = torch.autograd.grad((g * y).sum(), weights, allow_unused=True)
                for u, grad in zip(units, grads):
                    if grad is None:
                        continue
                    parts = grad.double().reshape(_slices(u, attention_units), -1)
                    acc[u.name] += (parts * parts).sum(1)
    finally:
        for w, r in zip(weights, requires):
            w.requires_grad_(r)
    weight_sq = {
        u.name: (u.module.weight.detach().double().reshape(_slices(u, attention_units), -1) ** 2
                 ).sum(1)
        for u in units
    }
    return Rates({n: v / draws for n, v in acc.items()}, weight_sq)
