"""Between-layer step (the paper's Algorithm 2): equal relative change rates, same function.

A unit's change rate is C = ||dL/dW|| / ||W|| under a label-free random linear loss
(rates.py). The moves are the function-preserving rescalings of the scale graph (moves.py):
under them log C responds exactly (-2 per log-scale of the unit's weight), so the update is
solved, not iterated blindly: a bounded least-squares fit of a common target (update.py,
solve.py), which lands in one round. Anchors no move breaks: the model's output (hence its
scale), every norm's eps, the attention temperature and other fixed rate products (such
pairs are only balanced), and no unit ends further from the mean of the final rates than it started
(centre.py moves the target where held-back units would drag that mean; on a fresh net q/k
slices may end further: their rates follow the stream's scale, which the attention
temperature ties them to). Fresh GELU/SiLU pairs move approximately (the second unit is
re-normalised to keep its statistics) and take a few rounds; so do units released by
--allow-function-change. The outputs are compared before and after on held-out images in
float64, and exact moves must leave them unchanged.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Collection, Iterable
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..distributed import from_main
from ..errors import FunctionChangedError
from ..report import FunctionCheck, UnitRecord
from .moves import Plan, apply_scales_
from .rates import Key, adam_log_rates, estimate_rates, output_tensors
from .units import Unit, calibration_mode
from .update import guard_bounds, solve_mean_guarded, solve_round, worst_deviation
from .within import measure_outputs, normalize_within_, reestimate_batchnorm_

log = logging.getLogger(__name__)

SCALE_FREE = ("zero gradient: one weight per channel reads data, and the BatchNorm after "
              "it normalises that weight away")
SCALE_FREE_RATE = 1e-2
STALL = 0.1  # a solve that moves no rate by this share of the tolerance has nothing left


@dataclass
class BetweenResult:
    iterations: int
    converged: bool
    target: float  # the common rate reached (not a log)
    check: FunctionCheck | None
    batchnorms_reestimated: int = 0
    # the widest spread among units that every allowed move scales alike: no move goes below
    floor: float | None = None
    # the median of the targeted units' starting rates (not a log): the target should land
    # near it unless units that cannot move drag it (their own rates pull a mean too)
    start: float | None = None
    floor_units: list[str] = field(default_factory=list)


@torch.no_grad()
def eval_outputs(model: nn.Module, images: Iterable[torch.Tensor]) -> torch.Tensor:
    """Every output tensor in eval mode, flattened per image and concatenated, computed in
    float64 on a copy: float32 rounding alone moves a deep net's outputs by up to ~1e-4
    (efficientnet_b0), which would hide a real change or refuse an exact move."""
    copy = deepcopy(model).double().eval()
    try:
        return torch.cat([torch.cat([t.flatten(1) for t in output_tensors(copy(x.double()))], 1)
                          for x in images])
    finally:
        del copy


def rescale_between_(
    model: nn.Module,
    plan: Plan,
    batches: Iterable[torch.Tensor],
    holdout: Iterable[torch.Tensor],
    records: dict[str, UnitRecord],
    *,
    batchnorm_order: dict[str, int] | None = None,
    grad_batches: int = 2,
    damping: float = 1.0,
    tol: float = 0.01,
    iters: int = 10,
    seed: int = 0,
    function_tol: float = 1e-4,
    optimizer: str = "sgd",
    scale_free: Collection[str] = (),
    progress: Callable[[str], None] | None = None,
) -> BetweenResult:
    """Equalise the change rates (SGD's ||dL/dW||/||W||, or Adam's lr/RMS(W)) of the movable
    unit slices in place; fill their records."""
    note = progress or (lambda msg: None)
    units, slices = plan.units, plan.slices
    adam = optimizer == "adam"
    before = eval_outputs(model, holdout)
    norms_before = {u.name: float(u.module.weight.detach().double().norm()) for u in units}

    note("estimating change rates")
    rates = rates_first = estimate_rates(model, units, batches, grad_batches, seed, slices)
    sgd = rates.log_rates()
    values = adam_log_rates(units, slices) if adam else sgd
    first = dict(values)
    response = -1.0 if adam else -2.0
    movable = [k for k in plan.keys if plan.movable(k)]
    # no gradient: never moves in training (a scale-free unit's is round-off)
    free_of_scale = confirmed_scale_free(scale_free, sgd)
    excluded = {k: SCALE_FREE if k in free_of_scale else "zero gradient"
                for k in movable if k not in sgd or k in free_of_scale}
    targeted = [k for k in movable if k not in excluded and k not in plan.balanced]
    counted = [k for k in movable if k not in excluded]
    t0 = sum(first[k] for k in targeted) / len(targeted) if targeted else 0.0
    noise = {} if adam else rates_first.log_rate_noise()  # Adam's RMS(W) is exact
    guard = {k: guard_bounds(first[k] - t0, noise.get(k, 0.0), tol) for k in counted}
    tied: set[Key] = set()
    target, iteration, converged, approx_moved = t0, 0, not targeted, False
    fixed = None  # the target, once the first solve has chosen it
    centre = None  # the mean the guards keep units near, where it is not the target
    done = torch.zeros(plan.basis.shape[0], dtype=torch.float64)  # the moves made so far
    while targeted:
        z, target, centre = solve_round(plan, values, targeted, counted, tied, guard, response,
                                   t0, tol, fixed, centre, done)
        if fixed is None:  # later rounds only correct approximate moves: no drifting target
            fixed = target
            ref = target if centre is None else centre
            ends = {k: values[k] + response * float(z[plan.var(k)]) - ref for k in counted}
            guard = {k: (min(guard[k][0], ends[k]), max(guard[k][1], ends[k]))
                     for k in counted}
        if every_tied := (tied >= {k for k in targeted if k in values}):
            # no unit can reach the target, but a solve may still narrow the spread: one
            # with the guard on the mean of the final rates itself (the guards above sit on
            # the solve's centre, which that mean need not be)
            z = solve_mean_guarded(plan, values, first, targeted, counted, response, t0,
                              math.log1p(tol), done)
        if (worst_deviation(values, targeted, tied, target) <= math.log1p(tol) and not every_tied
                ) or iteration >= iters:
            converged = worst_deviation(values, targeted, tied, target) <= math.log1p(tol)
            break
        if max(abs(response * float(z[plan.var(k)])) for k in targeted) < STALL * tol:
            # the bounds and guards hold every unit where it is: another round of gradient
            # draws would find the same solve; the units left off target are held back
            tied.update(k for k in targeted if k in values
                        and abs(values[k] - target) > math.log1p(tol))
            converged = True
            break
        iteration += 1
        note(f"between-layer iteration {iteration}")
        z = z * damping
        done = done + z
        approx_moved |= _apply_(model, plan, z, batches, batchnorm_order or {})
        if adam:
            values = adam_log_rates(units, slices)
            if not approx_moved:  # exact moves: Adam's rates are what the solve predicted
                converged = True
                break
        else:
            rates = estimate_rates(model, units, batches, grad_batches, seed, slices)
            values = rates.log_rates()
    reestimated = 0
    if approx_moved and any(u in plan.approximate and not _renormalised(plan, u)
                            for u in (x.name for x in units)):
        first_moved = min(u.order for u in units if u.name in plan.approximate)
        reestimated = reestimate_batchnorm_(model, batches, {
            n for n, o in (batchnorm_order or {}).items() if o > first_moved})
    _fill_records(plan, records, first, values, target, tol, excluded, tied, norms_before, adam,
                  rates_first, rates)
    after = eval_outputs(model, holdout)
    rel = from_main(float((after - before).norm() / before.norm().clamp_min(1e-30)))
    enforced = not approx_moved and plan.eps_exact
    check = FunctionCheck(rel_change=rel, tolerance=function_tol, enforced=enforced,
                          images=int(after.shape[0]),
                          scope="outputs" if enforced else
                          "outputs (fresh units moved through activations or norm eps, or "
                          "released)")
    if enforced and not rel <= function_tol:
        raise FunctionChangedError(
            f"The between-layer step changed the outputs by {rel:.2e} (relative), above the "
            f"tolerance {function_tol:g}; no checkpoint written. Report this model, or pass "
            "--allow-function-change to accept it.")
    floor, floor_units = _floor(plan, first, targeted)
    start = math.exp(statistics.median(first[k] for k in targeted)) if targeted else None
    return BetweenResult(iteration, converged, math.exp(target), check, reestimated,
                         floor=floor, floor_units=floor_units, start=start)


def confirmed_scale_free(names: Collection[str], log_rates: dict[Key, float]) -> set[Key]:
    """The slices of the scan's scale-free units (units.py) whose measured rate agrees: below
    SCALE_FREE_RATE of the median rate (round-off is 2.5e-3 of it in fastvit_t8); a unit whose
    output also reaches the loss another way keeps its rate and stays in."""
    if not names or not log_rates:
        return set()
    median = statistics.median(log_rates.values())
    return {k for k, v in log_rates.items()
            if k[0] in names and v < median + math.log(SCALE_FREE_RATE)}


def _floor(plan: Plan, first: dict[Key, float], targeted: list[Key]
           ) -> tuple[float | None, list[str]]:
    """The widest (max/min) starting spread of a group of targeted units that move only
    together (a pre-norm stream's writers behind GELU, depthwise convs whose LayerNorm input
    is held by eps): their ratios survive every function-preserving move."""
    spreads = [(max(first[k] for k in g) - min(first[k] for k in g), g)
               for g in plan.together([k for k in targeted if k in first])]
    if not spreads:
        return None, []
    width, group = max(spreads, key=lambda s: s[0])
    return math.exp(width), [plan.label(k) for k in group]


def _renormalised(plan: Plan, unit: str) -> bool:
    return unit in plan.renormalise or plan.graph.unit_out.get(unit) in plan.graph.relaxed


def _apply_(model: nn.Module, plan: Plan, z: torch.Tensor, batches, batchnorm_order) -> bool:
    """Apply one move; re-normalise the second unit of every relaxed pair that moved (its
    statistics are kept, scaled as the exact model predicts). Returns whether any move
    changed the function."""
    graph = plan.graph
    moved = [u for u in plan.units if u.name in plan.renormalise
             and abs(float(z[graph.unit_in[u.name]])) > 1e-7]
    free = [u for u in plan.units if u.name in plan.approximate and u.name not in
            plan.renormalise and graph.unit_out.get(u.name) not in graph.relaxed]
    changed = bool(moved) or any(
        abs(float(z[plan.var((u.name, s))])) > 1e-7 for u in free
        for s in range(plan.slices[u.name]))
    goals = {}
    if moved:
        with calibration_mode(model):
            moments = measure_outputs(model, moved, batches)
        for u in moved:
            f = math.exp(float(z[graph.unit_out[u.name]]))
            goals[u.name] = (moments[u.name].mean * f, moments[u.name].std * f)
    apply_scales_(model, plan, z)
    if moved:
        scan = _Scan(moved, batchnorm_order)
        normalize_within_(model, scan, batches, {u.name: UnitRecord(u.name, u.kind, u.shape)
                                                 for u in moved},
                          targets={u.name for u in moved}, goals=goals)
    return changed


@dataclass
class _Scan:
    """The part of a UnitScan normalize_within_ reads, for re-normalising a few units."""

    units: list[Unit]
    batchnorm_order: dict[str, int]
    gates: frozenset[str] = frozenset()  # every moved unit has an explicit goal
    outputs: frozenset[str] = frozenset()
    shared: frozenset[str] = frozenset()


def _fill_records(plan, records, first, values, target, tol, excluded, tied, norms_before,
                  adam, rates_first, rates_last) -> None:
    for u in plan.units:
        rec = records[u.name]
        k = plan.slices[u.name]
        keys = [(u.name, s) for s in range(k)]
        rec.compensation = plan.compensation.get(u.name, "-")
        norm_after = float(u.module.weight.detach().double().norm())
        if adam:  # lr / RMS(W) with lr = 1
            root = math.sqrt(u.module.weight.numel())
            rec.rate_before = root / norms_before[u.name] if norms_before[u.name] > 0 else None
            rec.rate_after = root / norm_after if norm_after > 0 else None
        else:
            rec.rate_before = _finite(rates_first.rate(u.name))
            rec.rate_after = _finite(rates_last.rate(u.name))
        rec.r = norm_after / norms_before[u.name] if norms_before[u.name] > 0 else None
        statuses = [_status(plan, key, values, target, tol, excluded, tied) for key in keys]
        if k > 1:
            names = plan.labels[u.name]
            rec.slices = [{"slice": names[s], "rate_before": _exp(first.get(key)),
                           "rate_after": _exp(values.get(key)), "status": st, "reason": why}
                          for s, (key, (st, why)) in enumerate(zip(keys, statuses))]
        rec.between_status, rec.between_reason = statuses[-1]
        if rec.between_status == "ok" and any(st == "balanced" for st, _ in statuses):
            rec.between_reason = "q/k balanced (attention temperature kept)"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _exp(v: float | None) -> float | None:
    return None if v is None else math.exp(v)


def _status(plan, key, values, target, tol, excluded, tied) -> tuple[str, str | None]:
    if key in plan.pinned:
        return "pinned", plan.pinned[key]
    if key in excluded:
        return "excluded", excluded[key]
    if key in plan.balanced:
        return "balanced", plan.pair_reason.get(
            key, "attention temperature: balanced with its partner, not targeted")
    v = values.get(key)
    if v is None:
        return "excluded", "zero gradient"
    if abs(v - target) <= math.log1p(tol):
        return "ok", None
    if key in tied:
        text = plan.compensation.get(key[0], "")
        if text.startswith("moves only with"):
            return "tied", text
        return "limited", ("held back by a norm's eps, the scale cap, another unit's anchor, "
                           "or the others' distance from the mean")
    return "not converged", None
