"""Relative change rates C = ||dL/dW|| / ||W|| under a label-free random linear loss.

L = sum(g * y) over every output tensor, with g a fresh Rademacher (+-1) draw for each
batch: the same expected squared gradient as a Gaussian draw with less variance. A fused
q/k/v (or k/v) projection gets one rate per slice. Under Adam every coordinate moves by
about the learning rate whatever the gradient scale, so its relative step is lr / RMS(W):
`adam_log_rates` needs no gradient at all. Under torchrun draw j runs on rank j % N and the
squared norms are summed over the ranks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..distributed import all_reduce_sum_, current, draw_batches
from .units import Unit, calibration_mode

Key = tuple[str, int]  # (unit name, slice)


def output_tensors(y) -> list[torch.Tensor]:
    """Every floating tensor of a model's output (logits, feature lists, dicts of maps)."""
    return [t for t in tree_flatten(y)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


@dataclass
class Rates:
    """Squared gradient norms (mean over draws) and squared weight norms, per unit slice."""

    grad_sq: dict[str, torch.Tensor]  # unit -> (slices,) float64, on the CPU
    weight_sq: dict[str, torch.Tensor]
    # the standard error of grad_sq over the draws (None with one draw)
    grad_sq_se: dict[str, torch.Tensor] | None = None

    def rate(self, name: str) -> float:
        g, w = float(self.grad_sq[name].sum()), float(self.weight_sq[name].sum())
        return math.sqrt(g / w) if w > 0 and math.isfinite(g) else float("nan")

    def slice_rates(self, name: str) -> list[float]:
        g, w = self.grad_sq[name], self.weight_sq[name]
        return [math.sqrt(float(a) / float(b)) if float(b) > 0 else float("nan")
                for a, b in zip(g, w)]

    def log_rate_noise(self) -> dict[Key, float]:
        """The standard error of each slice's log C, from the scatter of its draws:
        0.5 * se(grad_sq) / grad_sq (empty with one draw)."""
        out: dict[Key, float] = {}
        for name, se in (self.grad_sq_se or {}).items():
            for s, (m, e) in enumerate(zip(self.grad_sq[name].tolist(), se.tolist())):
                if m > 0 and math.isfinite(e):
                    out[(name, s)] = 0.5 * e / m
        return out

    def log_rates(self) -> dict[Key, float]:
        """log C per unit slice, for the slices that receive gradient."""
        out = {}
        for name in self.grad_sq:
            for s, c in enumerate(self.slice_rates(name)):
                if c > 0 and math.isfinite(c):
                    out[(name, s)] = math.log(c)
        return out


def _weight_sq(module: nn.Module, slices: int) -> torch.Tensor:
    return (module.weight.detach().double().reshape(slices, -1) ** 2).sum(1)


def estimate_rates(
    model: nn.Module,
    units: list[Unit],
    batches: Iterable[torch.Tensor],
    draws: int,
    seed: int,
    slices: dict[str, int] | None = None,
) -> Rates:
    """||dL/dW||^2 averaged over `draws` (batch, g) pairs; the same pairs for the same seed,
    so the estimate is a fixed function of the weights. BatchNorm runs on batch statistics,
    as in training, and its running statistics are restored afterwards."""
    slices = slices or {}
    weights = [u.module.weight for u in units]
    device = weights[0].device
    acc = {u.name: torch.zeros(slices.get(u.name, 1), dtype=torch.float64, device=device)
           for u in units}
    acc2 = {n: torch.zeros_like(a) for n, a in acc.items()}  # for the draws' spread
    requires = [w.requires_grad for w in weights]
    used = max(1, min(draws, len(batches)))
    mine = draw_batches(draws, len(batches))  # draw j -> its batch (draw j: rank j % N)
    if current().world == 1:
        take = list(itertools.islice(iter(batches), used))
    else:  # only the batches this rank's draws use
        take = {i: batches[i] for i in sorted(set(mine.values()))}
    try:
        with calibration_mode(model):
            for w in weights:
                w.requires_grad_(True)
            for j, b in mine.items():
                ys = output_tensors(model(take[b]))
                gen = torch.Generator(device=ys[0].device).manual_seed(seed * 1000003 + j)
                loss = sum(((torch.randint(0, 2, y.shape, generator=gen, device=y.device)
                             .to(y.dtype) * 2 - 1) * y).sum() for y in ys)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for u, grad in zip(units, grads):
                    if grad is not None:
                        parts = grad.detach().double().reshape(acc[u.name].numel(), -1)
                        sq = (parts * parts).sum(1)
                        acc[u.name] += sq
                        acc2[u.name] += sq * sq
    finally:
        for w, r in zip(weights, requires):
            w.requires_grad_(r)
    names = [u.name for u in units]
    sizes = [acc[n].numel() for n in names]
    flat = torch.cat([acc[n] for n in names] + [acc2[n] for n in names])
    all_reduce_sum_([flat])  # every rank's draws
    flat = (flat / draws).cpu()  # one transfer
    mean, mean_sq = flat.chunk(2)
    se = None
    if draws > 1:  # sqrt(unbiased variance of one draw / draws)
        se = dict(zip(names, ((mean_sq - mean * mean).clamp_min(0) / (draws - 1)).sqrt()
                      .split(sizes)))
    weight_sq = dict(zip(names, torch.cat([_weight_sq(u.module, k) for u, k in zip(units, sizes)])
                         .cpu().split(sizes)))
    return Rates(dict(zip(names, mean.split(sizes))), weight_sq, se)


def adam_log_rates(units: list[Unit], slices: dict[str, int] | None = None) -> dict[Key, float]:
    """log(lr / RMS(W)) with lr = 1, per unit slice: Adam's relative step."""
    slices = slices or {}
    out = {}
    for u in units:
        k = slices.get(u.name, 1)
        w = u.module.weight.detach().double().reshape(k, -1)
        rms = (w * w).mean(1).sqrt().cpu()
        for s in range(k):
            if float(rms[s]) > 0:
                out[(u.name, s)] = -math.log(float(rms[s]))
    return out
