"""The between-layer step's moves: units grouped by how their scale is compensated (DESIGN
1.2), and the in-place updates that scale a group without changing the function."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .trace import Follower
from .units import Unit

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


def apply_chain_(model: nn.Module, group: Group, scales: list[float]) -> None:
    cumulative = 1.0
    for u, r in zip(group.units, scales):
        cumulative *= r
        _scale_unit_(u.module, r, cumulative)
    if group.terminal is not None and group.terminal.kind in ABSORBERS:
        _absorb_(model, group.terminal, cumulative)


def apply_attention_(model: nn.Module, group: Group, s: float, a: float, p: float) -> None:
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
