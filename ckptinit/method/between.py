"""Between-layer step (the paper's Algorithm 2): equal relative change rates, same function.

A unit's change rate is C = ||dL/dW|| / ||W|| under a label-free random linear loss
L = sum(g * y). Scaling a unit by r moves its rate to C / r^2 when something downstream
forgets the scale (BatchNorm, LayerNorm, a LayerScale multiplier, or the next units of a
positively homogeneous chain whose scales multiply to one); the update
r = (C / Cbar)^(alpha / 2) then equalises the rates in one step for such units. Every move
is function-preserving by construction except where the user allows otherwise, and the
outputs are compared before and after on held-out images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FunctionChangedError
from ..report import FunctionCheck, UnitRecord
from . import moves
from .moves import Group, Plan, describe
from .rates import Rates, estimate_rates, output_tensor
from .units import calibration_mode, removing

EPS_BUDGET = 2e-5  # relative output error a norm's eps may add where its input is smallest


@torch.no_grad()
def norm_floors(model: nn.Module, plan: Plan, batch: torch.Tensor) -> dict[str, tuple]:
    """Smallest and largest total scale each LayerNorm/GroupNorm terminal tolerates.

    A norm forgets a scalar on its input only up to its eps: shrinking the input by P
    moves the output by about eps / (2 var) * (1 / P^2 - 1) where the input variance is
    small. The floor keeps that under EPS_BUDGET at the 1% quantile of that variance.
    """
    terminals = {g.terminal.target for g in plan.groups
                 if g.terminal is not None and g.terminal.kind == "norm"}
    floors: dict[str, tuple[float, float]] = {}
    if not terminals:  # no LayerNorm/GroupNorm terminal: spare the forward pass
        return floors
    handles = []

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().float()
            if isinstance(module, nn.GroupNorm):
                var = x.reshape(x.shape[0], module.num_groups, -1).var(-1, unbiased=False)
            elif type(module).__name__.endswith("2d"):  # timm's LayerNorm2d: NCHW, over C
                var = x.var(1, unbiased=False)
            else:
                dims = tuple(range(-len(module.normalized_shape), 0))
                var = x.var(dims, unbiased=False)
            v = float(torch.quantile(var.flatten()[:100000], 0.01).clamp_min(1e-30))
            room = 2.0 * v * EPS_BUDGET / module.eps  # |1 - 1/P^2| must stay under this
            floors[name] = (1.0 / math.sqrt(1.0 + room),
                            1.0 / math.sqrt(1.0 - room) if room < 1 else math.inf)

        return hook

    for name in terminals:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    with removing(handles), calibration_mode(model):
        model(batch)
    return floors


@dataclass
class BetweenResult:
    iterations: int
    converged: bool
    target: float
    check: FunctionCheck | None


def _log_dev(c: float, target: float) -> float:
    return abs(math.log(c / target)) if c > 0 and target > 0 else math.inf


@torch.no_grad()
def _eval_outputs(model: nn.Module, images: Sequence[torch.Tensor],
                  heads: Sequence[nn.Module] = ()) -> torch.Tensor:
    """Eval-mode outputs, or the inputs of `heads` (the features a new head reads)."""
    was = model.training
    model.eval()
    seen: list[torch.Tensor] = []
    handles = [h.register_forward_pre_hook(lambda m, a: seen.append(a[0].double().flatten(1)))
               for h in heads]
    try:
        with removing(handles):
            outs = [output_tensor(model(x)).double().flatten(1) for x in images]
        return torch.cat(seen if heads else outs)
    finally:
        model.train(was)


def _function_scope(plan: Plan) -> tuple[bool, list[nn.Module]]:
    """Can the check be enforced, and on what: the outputs, or the features read by a fresh
    head (a new classifier on loaded weights moves freely; what it reads must not move)."""
    changing = [g for g in plan.groups if g.changes_function]
    heads = [g.units[0].module for g in changing
             if len(g.units) == 1 and g.terminal is not None and g.terminal.kind == "output"]
    if len(heads) == len(changing) and len(heads) < len(
            [g for g in plan.groups if g.kind != "pinned"]):
        return True, heads
    return not changing, []


def rescale_between_(
    model: nn.Module,
    plan: Plan,
    batches: Sequence[torch.Tensor],
    holdout: Sequence[torch.Tensor],
    records: dict[str, UnitRecord],
    *,
    grad_batches: int = 4,
    damping: float = 1.0,
    tol: float = 0.01,
    iters: int = 10,
    seed: int = 0,
    function_tol: float = 1e-4,
    progress: Callable[[str], None] | None = None,
) -> BetweenResult:
    """Equalise the change rates of the movable units in place; fill their records.

    The same (batch, g) draws are reused in every iteration, so the estimated rates are a
    fixed function of the weights and the iteration converges instead of chasing noise.
    """
    units = [u for g in plan.groups for u in g.units]
    attention_units = {g.units[0].name for g in plan.groups if g.kind == "attention"}
    note = progress or (lambda msg: None)
    enforce, heads = _function_scope(plan)
    before = _eval_outputs(model, holdout, heads)

    def estimate() -> Rates:
        return estimate_rates(model, units, batches, grad_batches, seed, attention_units)

    note("estimating change rates")
    rates = estimate()
    for u in units:
        records[u.name].rate_before = rates.rate(u.name)
    totals = {u.name: 1.0 for u in units}
    floors = norm_floors(model, plan, batches[0])
    norm_scale = dict.fromkeys(floors, 1.0)  # total scale applied to each norm's input
    for g in plan.groups:
        for u in g.units:
            rec = records[u.name]
            rec.compensation = describe(g, u)
            if g.kind == "pinned":
                rec.between_status, rec.between_reason = "pinned", g.reason
    iteration, converged, target = 0, False, float("nan")
    while True:
        active = _active_units(plan, rates, records)
        constrained = [u.name for g in plan.groups if g.kind == "chain" for u in g.units
                       if u.name in active]
        basis = constrained or list(active)
        if not basis:
            converged = True
            break
        target = math.exp(sum(math.log(rates.rate(n)) for n in basis) / len(basis))
        worst = max(_log_dev(rates.rate(n), target) for n in active)
        if worst < math.log1p(tol):
            converged = True
            break
        if iteration >= iters:
            break
        iteration += 1
        note(f"between-layer iteration {iteration}")
        _step_(model, plan, rates, target, damping, active, totals, floors, norm_scale)
        rates = estimate()
    for u in units:
        rec = records[u.name]
        rec.rate_after = rates.rate(u.name)
        rec.r = totals[u.name]
        if rec.between_status in ("pinned", "excluded"):
            continue
        ok = _log_dev(rec.rate_after, target) < math.log1p(tol)
        rec.between_status = "ok" if ok else "not converged"
        terminal = plan.group_of(u.name).terminal
        if not ok and terminal is not None and terminal.target in floors:
            low, high = floors[terminal.target]
            if not low < norm_scale[terminal.target] < high:
                rec.between_reason = f"scale limited by the eps of {terminal.target}"
    after = _eval_outputs(model, holdout, heads)
    rel = float((after - before).norm() / before.norm().clamp_min(1e-30))
    check = FunctionCheck(rel_change=rel, tolerance=function_tol, enforced=enforce,
                          scope="features read by the new head" if heads else "outputs",
                          images=sum(len(h) for h in holdout))
    if check.enforced and not (rel <= function_tol):
        raise FunctionChangedError(
            f"The between-layer step changed the {check.scope} by {rel:.2e} (relative), above the "
            f"tolerance {function_tol:g}; no checkpoint written. Report this model, or pass "
            "--allow-function-change to accept it.")
    return BetweenResult(iteration, converged, target, check)


def _active_units(plan: Plan, rates: Rates, records: dict[str, UnitRecord]) -> set[str]:
    """Units that may move and receive gradient; the others are marked on their records."""
    active = set()
    for g in plan.groups:
        if g.kind == "pinned":
            continue
        for u in g.units:
            c = rates.rate(u.name)
            if not (c > 0 and math.isfinite(c)):
                rec = records[u.name]
                rec.between_status = "excluded"
                rec.between_reason = "zero gradient" if c == 0 else "non-finite gradient"
            else:
                active.add(u.name)
    return active


@torch.no_grad()
def _step_(model, plan: Plan, rates: Rates, target: float, damping: float, active: set[str],
           totals: dict[str, float], floors: dict[str, tuple[float, float]],
           norm_scale: dict[str, float]) -> None:
    """One update of every movable group towards the target rate.

    Compensated moves answer exactly C -> C / r^2 (a free unit at the model output scales
    every rate by the same factor, which leaves the ratios exact), so the full step lands.
    A fresh unit moved without compensation (into a residual sum, a GELU, a gate) answers
    more weakly
    and non-linearly; its step is halved and capped at 4x so the iteration cannot blow up.
    """
    for g in plan.groups:
        if g.kind == "pinned":
            continue
        if g.kind == "attention":
            if not all(u.name in active for u in g.units):
                continue
            s, a, p = _solve_attention(rates, g, target, damping)
            moves.apply_attention_(model, g, s, a, p)
            qkv, proj = g.units
            wq = rates.weight_sq[qkv.name].tolist()
            totals[qkv.name] *= math.sqrt((s * s * wq[0] + wq[1] / (s * s) + a * a * wq[2])
                                          / sum(wq))
            totals[proj.name] *= p / a
            continue
        scales = []
        for u in g.units:
            c = rates.rate(u.name)
            if u.name not in active:
                scales.append(1.0)
            elif g.changes_function and g.terminal.kind == "blocked":
                scales.append(min(4.0, max(0.25, (c / target) ** (damping / 4))))
            else:
                scales.append((c / target) ** (damping / 2))
        if g.kind == "chain":  # the product must stay one: equalise to the chain's own mean
            moving = [r for u, r in zip(g.units, scales) if u.name in active]
            norm = math.exp(sum(math.log(r) for r in moving) / len(moving)) if moving else 1.0
            scales = [r / norm if u.name in active else 1.0 for u, r in zip(g.units, scales)]
        if g.terminal is not None and g.terminal.target in floors:
            t = g.terminal.target
            total = norm_scale[t] * math.prod(scales)
            low, high = floors[t]
            bounded = min(max(total, low), high)  # beyond, the norm's eps would show
            scales[-1] *= bounded / total
            total = bounded
            norm_scale[t] = total
        moves.apply_chain_(model, g, scales)
        for u, r in zip(g.units, scales):
            totals[u.name] *= r


def _qkv_rate(gq, wq, s: float, a: float) -> float:
    g = gq[0] / s**2 + gq[1] * s**2 + gq[2] / a**2
    w = wq[0] * s**2 + wq[1] / s**2 + wq[2] * a**2
    return math.sqrt(g / w)


def _solve_attention(rates: Rates, group: Group, target: float, damping: float):
    """Choose (s, a, p): q*s, k/s, v*a, proj*(p/a), proj output * p absorbed downstream."""
    qkv, proj = group.units
    gq = rates.grad_sq[qkv.name].tolist()
    wq = rates.weight_sq[qkv.name].tolist()
    c_proj = rates.rate(proj.name)
    grid = [math.exp(x / 8) for x in range(-48, 49)]  # scales from e^-6 to e^6
    if group.proj_free:
        candidates = [(s, a) for s in grid for a in grid[24:73]]
    else:
        a = (target / c_proj) ** 0.5 if c_proj > 0 else 1.0
        candidates = [(s, a) for s in grid]

    def cost(sa):
        s, a = sa
        return abs(math.log(_qkv_rate(gq, wq, s, a) / target)) + 1e-3 * (
            abs(math.log(s)) + abs(math.log(a)))

    s, a = min(candidates, key=cost)
    p = a * (c_proj / target) ** 0.5 if group.proj_free and c_proj > 0 else 1.0
    s, a, p = s**damping, a**damping, p**damping
    return s, a, p
