"""One round of the between-layer step's update: the log-scales z of the plan's moves, from
a bounded least-squares fit of a common target (solve.py) under the guards.

The guards keep every unit within its start's distance of the mean (centre.py moves the
target where held-back units would drag that mean); the plan's eps and scale bounds are
hard. Units the fit leaves off target are tied and count only a little. When every unit is
tied, `solve_mean_guarded` narrows the spread with the guard on the mean of the final rates.
"""

from __future__ import annotations

import math

import torch

from .centre import recentre
from .moves import Plan
from .rates import Key
from .solve import Box, Term, solve

TIED_FACTOR = 3.0  # a unit predicted to stay this many tolerances off target is tied
TIED_WEIGHT = 1e-2  # tied units still count a little: they are balanced, not dropped
RELAX_PENALTY = 0.05  # the cost of a relaxed (approximate) move, against 2 for a rate
# how far 2 gradient draws' log rate may sit from an independent estimate (a loaded eva02
# of 6 blocks: up to 0.154 against 16 draws); the every-tied solve's guard allows for it.
# Loaded nets get 8 draws by default (options.LOADED_DRAWS), which sit closer: there the
# guard errs on the safe side
RATE_NOISE = 0.15
# A unit may cross the mean (following the target past it) but then ends this many standard
# errors of its own rate estimate short of its start's distance on the other side: at that
# distance exactly, an independent measurement reads it further half of the time (a loaded
# convnext_atto's stage-1 fc1 went from +0.23 to -0.23 and measured 0.02-0.09 further out)
CROSS_MARGIN = 2.0
HAIR = 1e-6  # how far (in log) the penalty solve may miss a box it holds


def worst_deviation(values: dict[Key, float], targeted: list[Key], tied: set[Key],
                    t: float) -> float:
    """The largest log distance from the target `t` among the targeted units not tied."""
    devs = [abs(values[k] - t) for k in targeted if k not in tied and k in values]
    return max(devs) if devs else 0.0


def guard_bounds(start: float, noise: float, tol: float) -> tuple[float, float]:
    """Where a unit that starts `start` (log) from the mean may end: within its start's
    distance (at least the tolerance), and on the far side of the mean CROSS_MARGIN
    standard errors of its rate estimate closer (never closer than the tolerance)."""
    near = max(abs(start), math.log1p(tol))
    far = max(near - CROSS_MARGIN * noise, math.log1p(tol))
    return (-far, near) if start >= 0 else (-near, far)


def solve_round(plan: Plan, values, targeted, counted, tied, guard, response, t0, tol, fixed,
           centre, done):
    """The bounded least-squares update; units that cannot reach the target become tied.
    The eps and scale bounds hold for the moves of all rounds together (`done` so far).
    Every unit stays as close to the mean as it started (`centre`, once chosen; until then
    the target): where tied units drag the mean of the final rates away from the target,
    the first round shifts the target until it does not (centre.py)."""
    z, t = _fit(plan, values, targeted, counted, tied, guard, response, t0, tol, fixed, centre,
                done)
    guarded = [k for k in counted if not (plan.all_fresh and k in plan.balanced)]
    for _ in range(2 if fixed is None else 0):
        ends = {k: v + response * float(z[plan.var(k)]) for k, v in values.items()}
        moved = recentre(ends, targeted, tied, guarded,
                         {k: max(-lo, hi) for k, (lo, hi) in guard.items()})
        if moved is None:
            break
        centre = moved[1]
        z, t = _fit(plan, values, targeted, counted, tied, guard, response, t0, tol,
                    moved[0], centre, done)
    return z, t, centre


def _fit(plan: Plan, values, targeted, counted, tied, guard, response, t0, tol, fixed, centre,
         done):
    """One bounded least-squares solve (the target `fixed` if given), tying the units it
    leaves off target and solving again."""
    for _ in range(4):
        terms = []
        for k in targeted:
            if k not in values:  # lost its gradient after a free move (a saturated gate)
                continue
            w = TIED_WEIGHT if k in tied else 1.0
            terms.append(Term({plan.var(k): response * w}, w * values[k], w))
        for v in plan.graph.relaxed:  # approximate moves only where exact ones cannot reach
            terms.append(Term({v: RELAX_PENALTY}, 0.0, 0.0))
        for q, k in plan.pairs:  # attention: q and k balanced, their product left alone
            if q in values and k in values:
                terms.append(Term({plan.var(q): response, plan.var(k): -response},
                                  values[q] - values[k], 0.0))
                if q in plan.pair_reason:  # a fixed product: only the target can meet it
                    terms.append(Term({}, TIED_WEIGHT * (values[q] + values[k]) / 2,
                                      TIED_WEIGHT))
        boxes = _after(plan.boxes, done)
        if fixed is not None:
            boxes.append(Box({}, fixed, fixed, 1.0))
        for k in counted:  # nobody ends further from the mean (or target) than it started
            if k in values and not (plan.all_fresh and k in plan.balanced):
                boxes.append(Box({plan.var(k): response}, *guard[k],
                                 0.0 if centre is not None else -1.0,
                                 values[k] - (centre or 0.0)))
        z, t = solve(plan.basis, terms, boxes, t0)
        z = _feasible(z, boxes[:len(plan.boxes)])
        off = [k for k in targeted if k not in tied and k in values
               and abs(values[k] + response * float(z[plan.var(k)]) - t)
               > TIED_FACTOR * math.log1p(tol)]
        if not off:
            return z, t
        tied.update(off)
    return z, t


def solve_mean_guarded(plan: Plan, values, first, targeted, counted, response, t0,
                  margin: float, done) -> torch.Tensor:
    """The move that narrows the spread most when no unit can reach a common target, with
    the guard on the mean of the final rates itself (every unit within its first distance
    from the first mean, plus `margin`): a linear constraint in the move, so one solve."""
    ks = [k for k in targeted if k in values]
    guarded = [k for k in counted if k in values and k in first]
    if not ks:
        return torch.zeros(plan.basis.shape[0], dtype=torch.float64)
    terms = [Term({plan.var(k): response}, values[k]) for k in ks]
    for q, k in plan.pairs:
        if q in values and k in values:
            terms.append(Term({plan.var(q): response, plan.var(k): -response},
                              values[q] - values[k], 0.0))
    hard = _after(plan.boxes, done)
    m_first = sum(first[k] for k in ks if k in first) / max(1, sum(k in first for k in ks))
    m_now = sum(values[k] for k in ks) / len(ks)
    guards = []
    for k in guarded:
        coef: dict[int, float] = {}
        coef[plan.var(k)] = response
        for j in ks:
            coef[plan.var(j)] = coef.get(plan.var(j), 0.0) - response / len(ks)
        a = first[k] - m_first  # not the guard: the first solve widened it
        # robust to RATE_NOISE in the start's estimate: a unit may cross the mean only to
        # 2 noises short of its start's distance, and one within a noise of it stays put
        inner = abs(a) - 2 * RATE_NOISE if abs(a) > RATE_NOISE else -abs(a)
        lo, hi = (-inner, abs(a)) if a >= 0 else (-abs(a), inner)
        guards.append(Box(coef, lo - margin, hi + margin, 0.0, values[k] - m_now))
    z, _ = solve(plan.basis, terms, hard + guards, t0)
    z = _feasible(z, hard)
    return z * _share(z, guards)


def _after(boxes: list[Box], done: torch.Tensor) -> list[Box]:
    """The plan's eps and scale bounds for the next move, the moves `done` so far counted."""
    return [Box(b.coef, b.lo, b.hi, b.t_coef,
                b.const + sum(c * float(done[v]) for v, c in b.coef.items())) for b in boxes]


def _share(z: torch.Tensor, boxes: list[Box]) -> float:
    """The largest share (at most 1) of z that keeps every box that the start meets, to
    the hair that the penalty solve holds its boxes to (a start that an earlier move left on
    a box's edge meets it: skipping that box let the next move carry the unit 0.65 in log
    past it)."""
    share = 1.0
    for b in boxes:
        val = sum(c * float(z[v]) for v, c in b.coef.items())
        if abs(val) < 1e-12 or not b.lo - HAIR <= b.const <= b.hi + HAIR:
            continue
        edge = (b.hi if val > 0 else b.lo) + math.copysign(HAIR, val)
        share = min(share, max(0.0, (edge - b.const) / val))
    return share


def _feasible(z: torch.Tensor, hard: list[Box]) -> torch.Tensor:
    """The eps and scale bounds are hard: where the solve could not meet them all (bounds
    in conflict with the target), shorten the move until it does (the start meets them)."""
    lam = 1.0
    for b in hard:
        val = sum(c * float(z[v]) for v, c in b.coef.items())
        if val + b.const > b.hi + 1e-12 and val > 0:
            lam = min(lam, max(0.0, (b.hi - b.const) / val))
        elif val + b.const < b.lo - 1e-12 and val < 0:
            lam = min(lam, max(0.0, (b.lo - b.const) / val))
    return z * lam
