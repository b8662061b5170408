"""The between-layer update as a bounded least-squares problem over function-preserving moves.

Every move that keeps the function is z = N y, with N an orthonormal basis of the scale
graph's null space (scales.py). The change rates respond exactly: log C_k -> log C_k -
2 z_k for SGD (log lr/RMS(W_k) -> ... - z_k for Adam), so one solve lands where the
constraints allow. Bounds keep each norm's eps invisible (shrinking a norm's input makes
its eps count) and every parameter within MAX_SCALE of where it was; box constraints on
the final deviations keep any unit from ending further from the mean than it started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .scales import ScaleGraph

EPS_BUDGET = 1e-6  # relative output change a LayerNorm/GroupNorm eps may add (function check)
# BatchNorm: eval mode is compensated exactly, so this is training mode only, fresh or
# loaded. At 1e-3 it held a loaded efficientnet_b0's depthwise convs (spread 13.8; 1.43 at
# 1e-2) for a training-mode output change of 2.7e-3 instead of 2.2e-3, next to 0.42 from
# swapping half of the batch for other images (benchmarks/README.md)
BN_EPS_BUDGET = 1e-2
FRESH_EPS_BUDGET = 1e-2  # a fresh net has no function to keep: its statistics' tolerance
MAX_SCALE = 1e3  # no parameter or activation is scaled by more than this, either way


@dataclass
class Term:
    """One residual: sum(coef[v] * z[v]) + const - weight * t (weight 0: a balance term)."""

    coef: dict[int, float]
    const: float
    weight: float = 1.0


@dataclass
class Box:
    """lo <= sum(coef[v] * z[v]) + t_coef * t + const <= hi."""

    coef: dict[int, float]
    lo: float
    hi: float
    t_coef: float = 0.0
    const: float = 0.0


def null_space(graph: ScaleGraph) -> torch.Tensor:
    """Orthonormal basis (nvars x d, float64) of all log-scale vectors the graph allows."""
    a = torch.zeros(len(graph.rows), graph.nvars, dtype=torch.float64)
    for i, row in enumerate(graph.rows):
        for v, c in row.items():
            a[i, v] = c
    if a.shape[0] == 0:
        return torch.eye(graph.nvars, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(a, full_matrices=True)
    tol = max(a.shape) * float(s.max()) * 1e-12 if s.numel() else 0.0
    rank = int((s > tol).sum())
    return vh[rank:].T.contiguous()


def norm_bounds(graph: ScaleGraph, budget: float = EPS_BUDGET) -> list[Box]:
    """Log-scale bounds on each norm's input: y = (x - m) / sqrt(v + eps) forgets a scale p of
    x only up to eps: the output moves by about eps / (2 v) * (1 / p^2 - 1). At the 1% quantile
    of v that must stay under the budget (`budget` for LayerNorm/GroupNorm, BN_EPS_BUDGET for
    BatchNorm, fresh or loaded); growing the input only shrinks the eps's share."""
    boxes = []
    for site in graph.norms:
        share = BN_EPS_BUDGET if site.kind == "batch_norm" else budget
        room = 2.0 * max(site.var_quantile, 1e-30) * share / max(site.eps, 1e-30)
        lo = -0.5 * math.log1p(room)
        hi = -0.5 * math.log1p(-room) if room < 1 else math.inf
        boxes.append(Box({site.var: 1.0}, lo, hi))
    return boxes


def running_var_bounds(graph: ScaleGraph, buffers: dict[str, torch.Tensor]) -> list[Box]:
    """Eval mode stays exact while p^2 (var + eps) >= eps for every channel's running
    variance (moves.apply_scales_): a BatchNorm whose smallest running variance is near 0
    (a channel dead on the calibration images, a RepVGG identity branch) may not shrink
    its input below p = sqrt(eps / (var + eps))."""
    boxes = []
    for _, rv, v, eps in graph.batchnorm_stats:
        t = buffers.get(rv)
        if t is None or not t.numel():
            continue
        low = max(float(t.detach().double().min()), 0.0)
        lo = 0.5 * math.log(eps / (low + eps)) if eps > 0 else -math.inf
        if lo > -math.log(MAX_SCALE):
            boxes.append(Box({v: 1.0}, lo, math.inf))
    return boxes


def scale_bounds(graph: ScaleGraph, basis: torch.Tensor) -> list[Box]:
    """|log scale| <= log(MAX_SCALE) for every variable that can move at all."""
    limit = math.log(MAX_SCALE)
    if basis.shape[1] == 0:  # no move at all
        return []
    movable = (basis.abs().amax(1) > 1e-9).nonzero().flatten().tolist()
    return [Box({v: 1.0}, -limit, limit) for v in movable]


def solve(basis: torch.Tensor, terms: list[Term], boxes: list[Box], t0: float,
          iters: int = 400) -> tuple[torch.Tensor, float]:
    """min over y, t of sum(residual^2) with z = basis @ y, subject to the boxes.

    A primal active-set method on the (small, dense) problem: solve with the active
    constraints held at their bounds (KKT, least squares), add the most violated ones,
    release the one whose multiplier pulls inwards most. t is parametrised as t0 + delta; only
    y carries a tiny ridge, so among equally good moves the smallest is taken and the
    target stays where the rates put it. Returns (z, t).
    """
    d = basis.shape[1]
    dtype = torch.float64
    if d == 0 or not terms:
        return torch.zeros(basis.shape[0], dtype=dtype), t0
    m = torch.zeros(len(terms), d + 1, dtype=dtype)
    b = torch.zeros(len(terms), dtype=dtype)
    for i, term in enumerate(terms):
        for v, c in term.coef.items():
            m[i, :d] += c * basis[v]
        m[i, d] = -term.weight
        b[i] = -(term.const - term.weight * t0)
    bm = torch.zeros(len(boxes), d + 1, dtype=dtype)
    lo = torch.zeros(len(boxes), dtype=dtype)
    hi = torch.zeros(len(boxes), dtype=dtype)
    for i, box in enumerate(boxes):
        for v, c in box.coef.items():
            bm[i, :d] += c * basis[v]
        bm[i, d] = box.t_coef
        shift = box.const + box.t_coef * t0
        lo[i], hi[i] = box.lo - shift, box.hi - shift
    ridge = torch.full((d + 1,), 1e-9, dtype=dtype)
    ridge[d] = 1e-12
    h = m.T @ m + torch.diag(ridge)
    g = m.T @ b
    # active set, with the held constraints as stiff penalties rather than exact KKT rows:
    # conflicting or degenerate held sets (narrow eps boxes against the target) then give
    # a least-squares compromise instead of a garbage solution; the caller shortens the
    # move if a hard bound is still missed by a hair
    rho = 1e6 * max(float(h.diagonal().abs().max()), 1.0)
    active: dict[int, bool] = {}  # box index -> held at its upper (True) or lower bound
    u = torch.linalg.solve(h, g)
    for _ in range(iters if len(boxes) else 0):
        bu = bm @ u
        below, above = lo - bu, bu - hi
        worst = torch.maximum(below, above)
        if active:
            worst[list(active)] = -math.inf
        changed = False
        if float(worst.max()) > 1e-9:  # hold the most violated constraints at their bounds
            for i in worst.topk(min(8, int((worst > 1e-9).sum()))).indices.tolist():
                active[i] = bool(above[i] > below[i])
            changed = True
        elif active:  # release the held constraint whose penalty pulls inwards the most:
            # one at a time, as releasing all of them at once can cycle (a loaded eva02's
            # 85 guards ran out of iterations 0.65 outside one of them)
            pulls = {i: float(bu[i] - hi[i]) if up else float(lo[i] - bu[i])
                     for i, up in active.items()}
            i = min(pulls, key=pulls.__getitem__)
            if pulls[i] < -1e-12:
                del active[i]
                changed = True
        if not changed:
            break
        u = _held(h, g, bm, lo, hi, active, rho)
    return basis @ u[:d], t0 + float(u[d])


def _held(h, g, bm, lo, hi, active: dict[int, bool], rho: float) -> torch.Tensor:
    """min 1/2 u'hu - g'u + rho/2 * sum over held rows of (row u - bound)^2."""
    if not active:
        return torch.linalg.solve(h, g)
    idx = list(active)
    a = bm[idx]
    bound = torch.stack([hi[i] if up else lo[i] for i, up in active.items()])
    return torch.linalg.lstsq(h + rho * a.T @ a, (g + rho * a.T @ bound)[:, None],
                              driver="gelsd").solution[:, 0]


def reach(basis: torch.Tensor, unit_vars: list[int]) -> torch.Tensor:
    """For each unit variable k, the smallest move y with x_k = 1 and every other unit still
    (least squares): column k of pinv(P), P = basis[unit_vars]. Returns (d, K)."""
    p = basis[unit_vars]
    return torch.linalg.pinv(p, rtol=1e-10)
