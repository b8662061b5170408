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

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FunctionChangedError
from ..report import FunctionCheck, UnitRecord
from .units import Follower, Unit, calibration_mode, removing

log = logging.getLogger(__name__)

ABSORBERS = ("batchnorm", "norm", "multiplier")


@dataclass
class Group:
    """Units that move together under one compensation rule."""

    kind: str  # "free" | "chain" (scales must multiply to one) | "attention" | "pinned"
    units: list[Unit]
    terminal: Follower | None = None  # what absorbs the product of the scales
    changes_function: bool = False  # moves that do not preserve the function (allowed)
    reason: str = ""
    proj_free: bool = False  # attention: the projection is followed by an absorber


@dataclass
class Plan:
    groups: list[Group] = field(default_factory=list)

    def group_of(self, name: str) -> Group:
        return next(g for g in self.groups if any(u.name == name for u in g.units))


def _output_tensor(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        y = list(y.values())
    return next(t for t in y if isinstance(t, torch.Tensor))


def plan_moves(
    model: nn.Module,
    units: list[Unit],
    followers: dict[str, Follower],
    fresh: set[str],
    allow_function_change: bool = False,
) -> Plan:
    """Group units by how their scale can be compensated (DESIGN 1.2)."""
    by_name = {u.name: u for u in units}
    nxt = {n: f.target for n, f in followers.items() if f.kind == "unit" and f.target in by_name}
    has_prev = set(nxt.values())
    plan = Plan()
    attention = _attention_pairs(model, by_name)
    in_attention = {n for pair in attention for n in pair}
    for u in units:
        if u.name in has_prev or u.name in in_attention:
            continue
        chain = [u]
        while chain[-1].name in nxt:
            chain.append(by_name[nxt[chain[-1].name]])
        terminal = followers.get(chain[-1].name, Follower("blocked", detail="not traced"))
        names = [c.name for c in chain]
        if any(c.weight_standardized for c in chain):
            plan.groups.append(Group("pinned", chain, terminal,
                                     reason="weight-standardized conv ignores its weight scale"))
        elif terminal.kind in ABSORBERS:
            plan.groups.append(Group("free", chain, terminal))
        elif allow_function_change or all(n in fresh for n in names):
            plan.groups.append(Group("free", chain, terminal, changes_function=True,
                                     reason="fresh" if not allow_function_change else "allowed"))
        elif len(chain) > 1:
            plan.groups.append(Group("chain", chain, terminal))
        else:
            plan.groups.append(Group("pinned", chain, terminal, reason=terminal.detail))
    for qkv, proj in attention:
        proj_f = followers.get(proj, Follower("blocked"))
        plan.groups.append(Group("attention", [by_name[qkv], by_name[proj]], proj_f,
                                 proj_free=proj_f.kind in ABSORBERS))
    return plan


def _attention_pairs(model: nn.Module, by_name: dict[str, Unit]) -> list[tuple[str, str]]:
    """timm-style attention with a fused qkv and a proj, nothing between them but softmax."""
    pairs = []
    for name, m in model.named_modules():
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            continue
        if not hasattr(m, "num_heads") or getattr(m, "gate", None) is not None:
            continue
        if any(not isinstance(getattr(m, a, nn.Identity()), nn.Identity)
               for a in ("q_norm", "k_norm", "norm")):
            continue
        if qkv.out_features != 3 * proj.in_features:
            continue
        q, p = f"{name}.qkv" if name else "qkv", f"{name}.proj" if name else "proj"
        if q in by_name and p in by_name and by_name[q].calls == 1:
            pairs.append((q, p))
    return pairs


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
                y = _output_tensor(model(x))
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


# --- applying moves -----------------------------------------------------------------------


def _scale_unit_(module: nn.Module, weight_scale: float, bias_scale: float) -> None:
    module.weight.mul_(weight_scale)
    if module.bias is not None:
        module.bias.mul_(bias_scale)


def _absorb_(model: nn.Module, terminal: Follower, p: float) -> None:
    """Undo a scale p on the input of the terminal (exactly, in eval mode too)."""
    if terminal.kind == "batchnorm":
        bn = model.get_submodule(terminal.target)
        if bn.running_mean is not None:
            bn.running_mean.mul_(p)
            # sqrt(rv' + eps) = p sqrt(rv + eps) keeps eval-mode outputs exact
            new_var = p * p * (bn.running_var.double() + bn.eps) - bn.eps
            if (new_var < 0).any():
                log.warning("%s: running variance clamped at 0 after scaling by %.3g",
                            terminal.target, p)
            bn.running_var.copy_(new_var.clamp_min(0).to(bn.running_var.dtype))
    elif terminal.kind == "multiplier":
        model.get_parameter(terminal.target).div_(p)
    # LayerNorm / GroupNorm: scalar-invariant, nothing to do


def _apply_chain_(model: nn.Module, group: Group, scales: list[float]) -> None:
    cumulative = 1.0
    for u, r in zip(group.units, scales):
        cumulative *= r
        _scale_unit_(u.module, r, cumulative)
    if group.terminal is not None and group.terminal.kind in ABSORBERS:
        _absorb_(model, group.terminal, cumulative)


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


def _apply_attention_(model: nn.Module, group: Group, s: float, a: float, p: float) -> None:
    qkv, proj = (u.module for u in group.units)
    d = proj.in_features
    for t in (qkv.weight, qkv.bias):
        if t is not None:
            t[:d].mul_(s)
            t[d : 2 * d].div_(s)
            t[2 * d :].mul_(a)
    _scale_unit_(proj, p / a, p)
    if group.proj_free:
        _absorb_(model, group.terminal, p)


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


# --- the iteration --------------------------------------------------------------------------


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
            outs = [_output_tensor(model(x)).double().flatten(1) for x in images]
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
            _apply_attention_(model, g, s, a, p)
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
        _apply_chain_(model, g, scales)
        for u, r in zip(g.units, scales):
            totals[u.name] *= r


def describe(g: Group, u: Unit) -> str:
    """The report's compensation column for a unit of group g."""
    if g.kind == "attention":
        return "attention q/k and v/proj pairs" + (
            f" + {g.terminal.kind} {g.terminal.target}" if g.proj_free else "")
    if g.kind == "pinned":
        return "-"
    t = g.terminal
    parts = []
    if len(g.units) > 1:
        parts.append(f"chain of {len(g.units)}")
    if g.kind == "free" and t is not None and t.kind in ABSORBERS:
        parts.append(f"{t.kind} {t.target}")
    elif g.kind == "chain":
        parts.append("scales multiply to 1")
    elif g.changes_function:
        parts.append(f"free ({g.reason})")
    return ", ".join(parts)
