"""What the between-layer step may move, and how: a Plan built on the scale graph.

A unit slice is *pinned* when no function-preserving move reaches its scale (a squeeze-
excite gate, a head between an activation and the output), *balanced* when only its ratio to
a partner can move (the q and k slices of attention: their product is the attention
temperature; the reduce/expand convs of a squeeze-excite gate behind a hard-swish: the
product of their rates is fixed), and movable otherwise. Moves are applied as one vector of
log-scales over parameters and BatchNorm statistics (`apply_scales_`), exact in eval mode
too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .._helpers import listing
from .rates import Key
from .scales import ScaleGraph, trace_scales
from .solve import (
    EPS_BUDGET,
    FRESH_EPS_BUDGET,
    Box,
    norm_bounds,
    null_space,
    reach,
    running_var_bounds,
    scale_bounds,
)
from .units import Unit, calibration_mode

log = logging.getLogger(__name__)

MOVABLE = 1e-9  # a basis row below this moves nothing
FREEZE = 2e-3  # a norm input allowed to scale by less than this (in log) is held fixed


@dataclass
class Plan:
    """The moves the between-layer step may make, and what the report says about them."""

    graph: ScaleGraph
    basis: torch.Tensor  # (nvars, d): every allowed log-scale vector is basis @ y
    units: list[Unit]
    slices: dict[str, int]  # unit -> 1, or 2/3 for fused k/v and q/k/v projections
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused unit -> its slices
    pinned: dict[Key, str] = field(default_factory=dict)  # no freedom, and why
    pairs: list[tuple[Key, Key]] = field(default_factory=list)  # (q, k): balanced only
    pair_reason: dict[Key, str] = field(default_factory=dict)  # non-q/k pairs: why
    approximate: set[str] = field(default_factory=set)  # units whose moves change the function
    renormalise: list[str] = field(default_factory=list)  # re-normalised after relaxed moves
    compensation: dict[str, str] = field(default_factory=dict)  # unit -> what absorbs its move
    boxes: list[Box] = field(default_factory=list)
    all_fresh: bool = False  # a fresh net: no function to keep, only statistics
    eps_exact: bool = True  # False: a fresh net's LayerNorm eps may shift the outputs a little

    @property
    def keys(self) -> list[Key]:
        return [(u.name, s) for u in self.units for s in range(self.slices.get(u.name, 1))]

    @property
    def balanced(self) -> set[Key]:
        return {k for pair in self.pairs for k in pair}

    def var(self, key: Key) -> int:
        return self.graph.unit_var(*key)

    def label(self, key: Key) -> str:
        """'name', or 'name[slice]' for a slice of a fused projection ('blocks.0.attn.qkv[q]')."""
        names = self.labels.get(key[0])
        return key[0] if names is None else f"{key[0]}[{names[key[1]]}]"

    def movable(self, key: Key) -> bool:
        return key not in self.pinned

    def together(self, keys: list[Key]) -> list[list[Key]]:
        """The groups (two or more) of `keys` that every allowed move scales alike. Their
        rates keep their ratios, so the widest group's spread is a floor for any spread."""
        if len(keys) < 2:
            return []
        rows = self.basis[[self.var(k) for k in keys]]
        same = torch.cdist(rows, rows) < 1e-6 * max(1.0, _largest(rows))
        groups, seen = [], set()
        for i in range(len(keys)):
            if i in seen:
                continue
            members = [j for j in same[i].nonzero()[:, 0].tolist() if j not in seen]
            seen.update(members)
            if len(members) > 1:
                groups.append([keys[j] for j in members])
        return groups


def slice_labels(model: nn.Module, slices: dict[str, int]) -> dict[str, tuple[str, ...]]:
    """What each slice of a fused unit is: q/k/v, k/v, or the gate and value halves of timm's
    GluMlp fc1 (in its `gate_last` order); by position where nothing says."""
    from timm.layers import GluMlp

    glu = {f"{n}.fc1" if n else "fc1": m.gate_last for n, m in model.named_modules()
           if isinstance(m, GluMlp)}
    out = {}
    for name, k in slices.items():
        if k == 1:
            continue
        if k == 2 and name in glu:
            out[name] = ("value", "gate") if glu[name] else ("gate", "value")
        elif k == 3:
            out[name] = ("q", "k", "v")
        elif k == 2 and name.rsplit(".", 1)[-1] == "kv":
            out[name] = ("k", "v")
        else:
            out[name] = tuple(str(i) for i in range(k))
    return out


def plan_moves(
    model: nn.Module,
    units: list[Unit],
    sample: torch.Tensor,
    fresh: set[str],
    allow_function_change: bool = False,
) -> Plan:
    """Trace the scale graph on `sample` and sort every unit slice into pinned, balanced or
    movable. Fresh units may also move through GELU-like activations between two fresh
    units (their second unit is then re-normalised); with `allow_function_change` every
    pinned unit is released and its moves change the function."""
    modules = {u.name: u.module for u in units}
    relax = {u.name for u in units if u.name in fresh}
    with calibration_mode(model):
        graph = trace_scales(model, sample, modules, relax=relax)
        basis = _relax_where_needed(graph, units)
        pinned_units = {u.name for u in units if _row(basis, graph, u.name) < MOVABLE}
        approximate: set[str] = set()
        if allow_function_change and pinned_units:
            graph = trace_scales(model, sample, modules, relax=relax, free=pinned_units)
            basis = _relax_where_needed(graph, units)
            approximate |= pinned_units
    # a fresh net has no function to keep: a norm's eps may then take a share up to the
    # statistics' tolerance (a ViT's near-zero cls token would otherwise freeze its stream)
    all_fresh = bool(units) and all(u.name in fresh for u in units)
    eps_exact = not (all_fresh and any(site.kind != "batch_norm" for site in graph.norms))
    norms = norm_bounds(graph, EPS_BUDGET if eps_exact else FRESH_EPS_BUDGET)
    narrow = [b for b in norms if b.hi - b.lo < FREEZE]
    for box in narrow:  # next to no room: the norm's input scale is held fixed
        for v in box.coef:
            graph.pin_(v, "a norm's eps (its input variance is near eps)")
    if narrow:
        basis = null_space(graph)
    slices = {u.name: graph.unit_slices(u.name) for u in units}
    plan = Plan(graph, basis, units, slices, slice_labels(model, slices), all_fresh=all_fresh,
                eps_exact=eps_exact)
    for key in plan.keys:
        if _largest(basis[plan.var(key)]) < MOVABLE:
            plan.pinned[key] = _pin_reason(graph, key[0])
    for u in units:
        if slices[u.name] == 3 and (u.name, 0) not in plan.pinned \
                and (u.name, 1) not in plan.pinned:
            plan.pairs.append(((u.name, 0), (u.name, 1)))
    for a, b in _fixed_products(plan):
        plan.pairs.append((a, b))
        for k, other in ((a, b), (b, a)):
            plan.pair_reason[k] = (f"its rate times {other[0]}'s is fixed (only their ratio "
                                   "moves: a gate's logits or a norm pin the scales around "
                                   "them): balanced, not targeted")
    plan.renormalise = [u.name for u in units if graph.relaxed_input(u.name)]
    plan.approximate = approximate | set(plan.renormalise) | {
        u.name for u in units if graph.unit_out.get(u.name) in graph.relaxed}
    plan.boxes = ([b for b in norms if b not in narrow] + scale_bounds(graph, basis)
                  + running_var_bounds(graph, dict(model.named_buffers())))
    plan.compensation = _compensations(model, plan)
    return plan


def _fixed_products(plan: Plan) -> list[tuple[Key, Key]]:
    """Unit pairs whose log-scales move by opposite amounts in every allowed move (x_a + x_b =
    0), so that the product of their change rates cannot move: the reduce and expand convs of
    a squeeze-excite gate whose input sits behind a non-homogeneous activation (hard-swish)
    and whose logits feed a sigmoid. Like q and k, such a pair can only be balanced."""
    keys = [k for k in plan.keys if k not in plan.pinned and plan.slices[k[0]] == 1]
    if len(keys) < 2:
        return []
    rows = plan.basis[[plan.var(k) for k in keys]]
    apart = torch.cdist(rows, -rows)  # ||row_a + row_b||
    apart.fill_diagonal_(math.inf)
    pairs, taken = [], set()
    for i, j in (apart < 1e-6 * max(1.0, _largest(rows))).nonzero().tolist():
        if i < j and i not in taken and j not in taken:
            pairs.append((keys[i], keys[j]))
            taken |= {i, j}
    return pairs


def _largest(t: torch.Tensor) -> float:
    """max |t|, 0 when empty (no function-preserving move at all: a net of one unit)."""
    return float(t.abs().max()) if t.numel() else 0.0


def _row(basis: torch.Tensor, graph: ScaleGraph, unit: str) -> float:
    return max(_largest(basis[graph.unit_var(unit, s)]) for s in range(graph.unit_slices(unit)))


def _relax_where_needed(graph: ScaleGraph, units: list[Unit]) -> torch.Tensor:
    """Keep a relaxed activation (an approximate move) only where exact moves cannot reach
    the units on either side of it, and where it frees the output of the unit it feeds.
    Returns the null space of what is kept."""
    if graph.relaxed:
        exact = ScaleGraph(**{**graph.__dict__, "rows": graph.rows + [
            {v: 1.0} for v in graph.relaxed]})
        alone = _individually_movable(null_space(exact), exact, units)
        for v in list(graph.relaxed):
            ends = graph.fed_by(v) + [u for u, ov in graph.unit_out.items() if ov == v]
            if all(u in alone for u in ends):
                graph.pin_(v, graph.relaxed.pop(v))
    basis = null_space(graph)
    freed = False
    for v in list(graph.relaxed):
        consumers = [u for u in graph.fed_by(v) if u in graph.unit_out]
        if all(_largest(basis[graph.unit_out[u]]) < MOVABLE for u in consumers):
            graph.pin_(v, graph.relaxed.pop(v))
            freed = True
    return null_space(graph) if freed else basis


def _individually_movable(basis: torch.Tensor, graph: ScaleGraph, units: list[Unit]
                          ) -> set[str]:
    """Units each of whose weight slices can move while every other slice stays (a fused
    GLU fc1 whose gate half sits behind the activation is not, though its value half is)."""
    keys = [(u.name, s) for u in units for s in range(graph.unit_slices(u.name))]
    unit_vars = [graph.unit_var(*k) for k in keys]
    p = basis[unit_vars]
    if p.shape[1] == 0:
        return set()
    hit = p @ reach(basis, unit_vars)  # (K, K): ideally the identity
    err = (hit - torch.eye(len(keys), dtype=hit.dtype)).abs().amax(0)
    stuck = {k[0] for k, e in zip(keys, err.tolist()) if e >= 1e-6}
    return {u.name for u in units} - stuck


def _pin_reason(graph: ScaleGraph, unit: str) -> str:
    """Why no move reaches a unit: what fixes the scale of its input and of its output."""
    inp = graph.pins.get(graph.unit_in.get(unit, -1))
    out = graph.pins.get(graph.unit_out.get(unit, -1))
    if inp and out:
        return f"input fixed by {inp}, output fixed by {out}"
    if out:
        return f"output fixed by {out}"
    if inp:
        return f"input fixed by {inp}"
    return "tied to fixed scales"


def _compensations(model: nn.Module, plan: Plan) -> dict[str, str]:
    """What absorbs a move of each movable unit alone, or the units it can only move with."""
    keys = [(u.name, plan.slices[u.name] - 1) for u in plan.units]  # v for q/k/v projections
    keys = [k for k in keys if k not in plan.pinned]
    if not keys:
        return {}
    graph, basis = plan.graph, plan.basis
    unit_vars = [plan.var(k) for k in keys]
    moves = reach(basis, unit_vars)  # (d, K)
    weights = {f"{u.name}.weight" for u in plan.units} | {f"{u.name}.bias" for u in plan.units}
    names: dict[int, list[str]] = {}
    for (pname, _), v in graph.param_var.items():
        if pname not in weights:
            names.setdefault(v, []).append(pname.rsplit(".", 1)[0] if pname.endswith(
                (".weight", ".bias")) else pname)
    for rm, _, v, _ in graph.batchnorm_stats:
        names.setdefault(v, []).append(f"{rm.rsplit('.', 1)[0]} statistics")
    out = {}
    p = basis[unit_vars]
    for j, key in enumerate(keys):
        y = _local_move(basis, p, j, graph.unit_in.get(key[0]))
        z = basis @ (y if y is not None else moves[:, j])
        others = (p @ (y if y is not None else moves[:, j])).abs()
        others[j] = 0
        if float(others.max()) > 1e-6 or abs(float(z[unit_vars[j]]) - 1) > 1e-6:
            tied = [keys[i][0] for i in others.argsort(descending=True).tolist()
                    if float(others[i]) > 0.05]
            out[key[0]] = listing(tied, prefix="moves only with")
            continue
        touched = sorted(((abs(float(z[v])), n) for v, ns in names.items() for n in ns
                          if abs(float(z[v])) > 0.05), reverse=True)
        out[key[0]] = listing(list(dict.fromkeys(n for _, n in touched))) or "none needed"
    return out


def _local_move(basis: torch.Tensor, p: torch.Tensor, j: int, input_var: int | None):
    """The move of unit j alone that leaves its input where it is (absorbed downstream), if
    there is one: the natural description of what compensates it."""
    if input_var is None:
        return None
    a = torch.cat([p, basis[input_var][None]])
    b = torch.zeros(a.shape[0], dtype=a.dtype)
    b[j] = 1.0
    y = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]
    return y if float((a @ y - b).abs().max()) < 1e-6 else None


@torch.no_grad()
def apply_scales_(model: nn.Module, plan: Plan, z: torch.Tensor) -> None:
    """Scale every parameter (slice) by exp(z[its variable]); BatchNorm running statistics
    follow their input's scale so that eval mode stays exact: mean * p, and the variance
    such that sqrt(var' + eps) = p * sqrt(var + eps)."""
    graph = plan.graph
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for (name, s), v in graph.param_var.items():
        f = math.exp(float(z[v]))
        if name not in params or f == 1.0:
            continue
        p = params[name]
        k = graph.slices.get(name, 1)
        part = p if k == 1 else p[s * (p.shape[0] // k):(s + 1) * (p.shape[0] // k)]
        part.mul_(f)
    for rm, rv, v, eps in graph.batchnorm_stats:
        f = math.exp(float(z[v]))
        if f == 1.0 or rm not in buffers or rv not in buffers:
            continue
        buffers[rm].mul_(f)
        var = f * f * (buffers[rv].double() + eps) - eps
        if bool((var < 0).any()):
            log.warning("%s: running variance clamped at 0 after scaling by %.3g", rv, f)
        buffers[rv].copy_(var.clamp_min(0).to(buffers[rv].dtype))
