"""Where the common target goes when some units cannot reach it.

"No unit ends further from the mean than it started" is about the geometric mean of the
final rates of the targeted units, not the solve's target. Units held back by a norm's eps
(or tied to others) stay where they are; when they sit mostly on one side, the free units
landing on the target drag the mean away from them, and the ones on the other side end
further out (loaded convnext_atto: its depthwise convs feed LayerNorms whose inputs are
near eps). Shifting the target of the free units (and holding back the ones that would then end
outside their own slack) moves the mean; `recentre` picks the smallest shift that keeps
every guarded unit within its start's distance of the mean.
"""

from __future__ import annotations

import torch

from .rates import Key

SPAN = 3.0  # the largest shift of the target considered, in log
STEP = 0.005


def recentre(ends: dict[Key, float], targeted: list[Key], tied: set[Key], guarded: list[Key],
             slack: dict[Key, float]) -> tuple[float, float] | None:
    """(the target for the free units, the mean of the final rates then), or None where the
    free units on the target already keep everyone within their slack (or nothing helps).

    `ends`: every unit's final log rate as the solve predicts it. Free (untied targeted)
    units follow the target t, each clipped to its slack around the final mean m (so some
    end short of t); the others stay. m is the fixed point m = mean(final rates), found by
    bisection for every t on a grid (refined once around the best); the t kept is the
    nearest one at which no other unit ends outside its slack."""
    keys = [k for k in targeted if k in ends]
    guarded = [k for k in guarded if k in ends]
    if not keys or not guarded:
        return None
    dt = torch.float64
    vals = torch.tensor([ends[k] for k in keys], dtype=dt)
    free = torch.tensor([k not in tied for k in keys])
    room = torch.tensor([slack.get(k, 0.0) for k in keys], dtype=dt)
    g_vals = torch.tensor([ends[k] for k in guarded], dtype=dt)
    g_room = torch.tensor([slack[k] for k in guarded], dtype=dt)
    g_fixed = torch.tensor([k not in keys or k in tied for k in guarded])
    mean0 = float(vals.mean())
    now = float(((g_vals - mean0).abs() - g_room).clamp_min(0)[g_fixed].max()) \
        if bool(g_fixed.any()) else 0.0
    free_now = float(((vals - mean0).abs() - room).clamp_min(0)[free].max()) \
        if bool(free.any()) else 0.0
    if max(now, free_now) <= 1e-4:
        return None

    def outside(ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For every target: how far the worst held unit ends outside its slack, and m."""
        lo = torch.full_like(ts, float(vals.min()) - SPAN)
        hi = torch.full_like(ts, float(vals.max()) + SPAN)
        for _ in range(60):  # mean(final(m)) - m decreases in m: bisection
            m = (lo + hi) / 2
            near = torch.minimum(torch.maximum(ts[:, None], m[:, None] - room),
                                 m[:, None] + room)
            up = torch.where(free[None], near, vals[None]).mean(1) > m
            lo, hi = torch.where(up, m, lo), torch.where(up, hi, m)
        m = (lo + hi) / 2
        over = torch.where(g_fixed[None], (g_vals[None] - m[:, None]).abs() - g_room[None],
                           torch.zeros(1, dtype=dt)).amax(1).clamp_min(0)
        return over, m

    t0 = float(vals[free].mean()) if bool(free.any()) else mean0
    ts = t0 + torch.arange(-SPAN, SPAN + STEP / 2, STEP, dtype=dt)
    over, m = outside(ts)
    i = int(over.argmin())
    fine = float(ts[i]) + torch.linspace(-STEP, STEP, 401, dtype=dt)
    over_f, m_f = outside(fine)
    best = float(over_f.min())
    if best >= now - 1e-6 and free_now <= 1e-4:
        return None
    ok = (over_f <= best + 1e-9).nonzero().flatten()
    j = int(ok[(fine[ok] - t0).abs().argmin()])
    return float(fine[j]), float(m_f[j])
