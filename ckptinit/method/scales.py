"""Which rescalings leave the network's function unchanged: a scale graph from one forward pass.

Every floating tensor of one traced forward pass gets a log-scale variable s, every
parameter (or q/k/v slice of a fused projection) a log-scale x. Each op constrains them:
homogeneous ops (ReLU, pooling, reshapes) pass the scale through, sums and concatenations
need equal scales, a conv or linear adds its weight's scale, a norm forgets its input's
scale and gives its affine's, attention needs s_q + s_k = 0, and any other op (GELU,
sigmoid, softmax, an unknown function) keeps its input and output at scale 0, as do the
model input and output. Every solution of these linear constraints is a set of parameter
scales that leaves the output unchanged; under it, unit k's change rate moves by exactly
exp(-2 x_k) (its gradient scales by exp(-x_k), its weight by exp(x_k)).

The trace runs the model under a TorchFunctionMode, so functional code inside timm's
modules is seen as it runs; the variables ride on the tensors themselves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import ops

_ATTR = "_ckptinit_scale"  # the scale variables of a traced tensor, set on the tensor itself
_SRC = "_ckptinit_fused"  # (unit, its output) behind a tensor, while looking for fused slices


@dataclass
class NormSite:
    """A norm op: what its input scale may do without its eps showing (see solve.py)."""

    var: int  # the input's scale variable
    kind: str  # layer_norm | group_norm | batch_norm | instance_norm | rms_norm | standardization
    params: list[str]  # its affine parameters
    var_quantile: float  # 1% quantile of the variance it normalises, on the traced sample
    eps: float


@dataclass
class ScaleGraph:
    """Linear constraints sum(coef * var) = 0 over log-scales, after merging equal variables."""

    nvars: int
    rows: list[dict[int, float]]
    param_var: dict[tuple[str, int], int]  # (parameter name, slice) -> variable
    slices: dict[str, int]  # parameter name -> slices (2 or 3 for fused kv/qkv projections)
    unit_in: dict[str, int]  # unit name -> its input's variable (first call)
    unit_out: dict[str, int]  # unit name -> its output's variable (first call; slice 0)
    norms: list[NormSite]
    batchnorm_stats: list[tuple[str, str, int, float]]  # (running_mean, running_var, var, eps)
    pins: dict[int, str]  # variable -> why it is fixed at 0
    relaxed: dict[int, str] = field(default_factory=dict)  # variable -> activation passed through
    # GLU products (act(gate) * value, value a unit's output) feeding a unit -> their factors
    products: dict[int, list[int]] = field(default_factory=dict)

    def fed_by(self, var: int) -> list[str]:
        """Units whose input is `var`, or a product with `var` among its factors (a GLU's
        act(gate) * value feeding fc2)."""
        return [u for u, v in self.unit_in.items()
                if v == var or var in self.products.get(v, ())]

    def relaxed_input(self, unit: str) -> bool:
        v = self.unit_in.get(unit)
        return v in self.relaxed or any(f in self.relaxed for f in self.products.get(v, ()))

    def unit_var(self, unit: str, slice_: int = 0) -> int:
        return self.param_var[(f"{unit}.weight", slice_)]

    def unit_slices(self, unit: str) -> int:
        return self.slices.get(f"{unit}.weight", 1)

    def pin_(self, var: int, why: str) -> None:
        self.rows.append({var: 1.0})
        self.pins.setdefault(var, why)


class _Union:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:  # path halving
            self.parent[a] = a = self.parent[self.parent[a]]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@torch.no_grad()
def find_fused_slices(model: nn.Module, sample: torch.Tensor, units: dict[str, nn.Module]
                      ) -> dict[str, int]:
    """Linear units whose output is reshaped and split into 2 or 3 equal parts (fused kv or
    qkv projections), verified on the values: unit name -> number of slices."""
    weights = {id(m.weight): n for n, m in units.items() if isinstance(m, nn.Linear)}
    found: dict[str, int] = {}

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = ops.op_name(func)
            ins = ops.tensors_in((args, kwargs))
            if name == "linear" and len(ins) > 1 and id(ins[1]) in weights:
                if isinstance(out, torch.Tensor):
                    out.__dict__[_SRC] = (weights[id(ins[1])], out)
            elif name in ops.SLICE_KEEP and ins and isinstance(out, torch.Tensor):
                src = ins[0].__dict__.get(_SRC)
                if src is not None:
                    out.__dict__[_SRC] = src
            elif name in ops.SLICE_SPLIT and ins:
                src = ins[0].__dict__.get(_SRC)
                outs = ops.tensors_in(out)
                if src is not None and len(outs) in (2, 3):
                    unit, y = src
                    d = y.shape[-1] // len(outs)
                    if d * len(outs) == y.shape[-1] and all(
                            math.isclose(float(o.double().sum()),
                                         float(y[..., k * d:(k + 1) * d].double().sum()),
                                         rel_tol=1e-4, abs_tol=1e-5 * float(y.abs().sum()) + 1e-9)
                            and o.numel() == y[..., :d].numel()
                            for k, o in enumerate(outs)):
                        found.setdefault(unit, len(outs))
            return out

    with Mode():
        model(sample)
    return found


def trace_scales(model: nn.Module, sample: torch.Tensor, units: dict[str, nn.Module],
                 relax: set[str] = frozenset(), free: set[str] = frozenset()) -> ScaleGraph:
    """The scale graph of `model` on `sample` (a few images, the model in calibration mode).

    `relax` names units whose output may pass an approximately homogeneous activation
    (GELU, SiLU, ...) on its way into another relaxed unit: the pair then moves like a
    homogeneous chain, and the caller re-normalises the second unit (see between.py).
    `free` names units whose weight scale is released from the function (a slack variable
    absorbs it): --allow-function-change.
    """
    fused = find_fused_slices(model, sample, units)
    params = {id(p): n for n, p in model.named_parameters()}
    buffers = {id(b): n for n, b in model.named_buffers()}
    weight_unit = {f"{n}.weight": n for n in units}
    slices = {f"{u}.{p}": k for u, k in fused.items() for p in ("weight", "bias")}
    uf = _Union()
    rows: list[dict[int, float]] = []
    pins: list[tuple[int, str]] = []
    pvar: dict[tuple[str, int], int] = {}
    unit_in: dict[str, int] = {}
    unit_out: dict[str, int] = {}
    norms: list[tuple[int, str, list[str], float, float]] = []
    bn_stats: list[tuple[str, str, int, float]] = []
    relaxed: list[tuple[int, str, str | None]] = []  # (var, activation, producing unit)
    producer: dict[int, str] = {}  # var -> relaxed unit whose output it is
    factors: dict[int, list[int]] = {}  # product var -> its factors' vars
    unit_outs: list[int] = []  # every slice's output var of every relaxed unit
    keep: list[torch.Tensor] = []

    def param_vars(name: str) -> list[int]:
        out = []
        for s in range(slices.get(name, 1)):
            if (name, s) not in pvar:
                pvar[(name, s)] = uf.new()
            out.append(pvar[(name, s)])
        return out

    def vars_of(t: torch.Tensor) -> list[int]:
        vs = t.__dict__.get(_ATTR)
        if vs is not None:
            return vs
        if id(t) in params:
            return param_vars(params[id(t)])
        v = uf.new()  # a constant: a buffer, a mask, a fixed embedding
        if not (t.is_floating_point() and not t.any()):  # zeros take any scale
            pins.append((v, "a constant"))
        return [v]

    def one(vs: list[int]) -> int:
        for v in vs[1:]:
            uf.union(vs[0], v)
        return vs[0]

    def give(ts, vs: list[int]) -> None:
        for t in ts:
            t.__dict__[_ATTR] = vs
            keep.append(t)

    def fix(vs_list, why: str) -> None:
        for vs in vs_list:
            for v in vs:
                pins.append((v, why))

    def rule(name: str, args, kwargs, fins: list[torch.Tensor], outs: list[torch.Tensor]):
        ins = [vars_of(t) for t in fins]
        numbers = ops.numbers_in(args, kwargs)
        if name in ops.AFFINE and len(fins) >= 2:
            xv, wv = one(ins[0]), ins[1]
            pname = params.get(id(fins[1]))
            unit = weight_unit.get(pname)
            if len(wv) > 1:  # fused projection: one output variable per slice
                ov = [uf.new() for _ in wv]
                for k, w in enumerate(wv):
                    rows.append({ov[k]: 1.0, xv: -1.0, w: -1.0})
            else:
                ov = [uf.new()]
                row = {ov[0]: 1.0, xv: -1.0, wv[0]: -1.0}
                if unit in free:
                    row[uf.new()] = -1.0  # the slack: the output no longer follows the weight
                rows.append(row)
            if len(ins) > 2:  # the bias takes the output's scale
                if len(ins[2]) == len(ov):
                    for b, o in zip(ins[2], ov):
                        uf.union(b, o)
                else:
                    uf.union(one(ins[2]), one(ov))
            if unit is not None:
                unit_in.setdefault(unit, xv)
                unit_out.setdefault(unit, ov[0])
                if unit in relax:
                    producer[ov[0]] = unit
                    unit_outs.extend(ov)
            give(outs, ov)
            return
        if name in ops.NORMS:
            xv = one(ins[0])
            weight, bias = ops.norm_affine(name, args, kwargs)
            given = [t for t in (weight, bias) if isinstance(t, torch.Tensor)]
            # a parameter or a computed tensor (ScaledStdConv's gain * scale): its scale
            affine = [one(vars_of(t)) for t in given]
            names = [params[id(t)] for t in given if id(t) in params]
            ov = uf.new()
            has_weight = isinstance(weight, torch.Tensor)
            if affine and has_weight:
                for a in affine:
                    uf.union(a, ov)
            else:
                pins.append((ov, f"output of {name} without a scalable weight"))
                for a in affine:
                    pins.append((a, f"bias of {name} without weight"))
            x = fins[0].detach().double()
            kind = name
            if name == "layer_norm" or name == "rms_norm":
                shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
                dims = tuple(range(-len(shape), 0))
            elif name == "group_norm":
                g = args[1] if len(args) > 1 else kwargs.get("num_groups", 1)
                x = x.reshape(x.shape[0], g, -1)
                dims = (-1,)
            elif name == "instance_norm":
                dims = tuple(range(2, x.dim()))
            else:  # batch_norm: per channel over batch and positions
                dims = tuple(d for d in range(x.dim()) if d != 1)
                stats = [buffers.get(id(t)) for t in fins[1:3]]
                eps = args[7] if len(args) > 7 else kwargs.get("eps", 1e-5)
                if all(stats) and len(stats) == 2:
                    bn_stats.append((stats[0], stats[1], xv, float(eps)))
                else:  # no running statistics, so no eval mode that compensates its eps
                    kind = "standardization"  # (timm's ScaledStdConv on its weight)
            var = x.var(dims, unbiased=False).flatten()
            q = float(torch.quantile(var[:100000], 0.01)) if var.numel() else 0.0
            floats = [a for a in numbers if isinstance(a, float)]
            eps = floats[-1] if floats else 1e-5
            norms.append((xv, kind, names, q, float(eps)))
            give(outs, [ov])
            return
        if name in ops.ATTENTION and len(ins) >= 3:
            q, k, v = (one(a) for a in ins[:3])
            rows.append({q: 1.0, k: 1.0} if q != k else {q: 2.0})
            fix(ins[3:], "attention mask")
            give(outs, [v])
            return
        if name in ops.SLICE_SPLIT and len(ins) == 1 and len(ins[0]) == len(outs) > 1:
            for t, v in zip(outs, ins[0]):
                give([t], [v])
            return
        if name in ops.SLICE_KEEP and len(ins) == 1 and len(ins[0]) > 1:
            give(outs, list(ins[0]))
            return
        if name in ops.LIKE and ins and len(fins) == 2:  # the other tensor gives a type or a shape
            give(outs, [one(ins[0])])
            return
        if name in ops.HOMOGENEOUS and len(ins) == 1 and ops.homogeneous_args(name, args, kwargs):
            give(outs, [one(ins[0])])
            return
        if name in ops.JOINING and ops.bias_pieces(args, kwargs, fins):
            give(outs, [one(v) for v in ins])  # cat(q_bias, k_bias, v_bias): one per slice
            return
        if (name in ops.ADDITIVE and name not in ops.JOINING and len(ins) > 1 and len(ins[0]) > 1
                and all(len(v) == len(ins[0]) for v in ins)
                and len({t.shape[-1] for t in fins}) == 1 and not numbers):
            for vs in zip(*ins):  # a fused output plus its per-slice bias: slice by slice
                one(list(vs))
            give(outs, list(ins[0]))
            return
        if name in ops.ADDITIVE and ins and (name in ops.JOINING or not any(n != 0 for n in numbers
                                                                     if "alpha" not in kwargs)):
            vs = [one(v) for v in ins]
            for v in vs[1:]:
                uf.union(vs[0], v)
            give(outs, [vs[0]])
            return
        if (name in ops.MULTIPLY and ins) or (name in ops.PRODUCT and len(ins) in (1, 2)):
            ov = uf.new()  # log-scale of a product: the sum of its factors'
            row = {ov: 1.0}
            for v in (one(v) for v in ins):
                row[v] = row.get(v, 0.0) - 1.0
            rows.append(row)
            factors[ov] = [one(v) for v in ins]
            give(outs, [ov])
            return
        if name in ops.DIVIDE and ins:
            ov = uf.new()
            row = {ov: 1.0}
            vs = [one(v) for v in ins]
            row[vs[0]] = row.get(vs[0], 0.0) - 1.0
            if len(vs) > 1:
                row[vs[1]] = row.get(vs[1], 0.0) + 1.0
            rows.append(row)
            give(outs, [ov])
            return
        if name in ops.SCALE_FREE_OUT and ins:
            ov = uf.new()
            pins.append((ov, name))
            give(outs, [ov])
            return
        if name in ops.APPROX_HOMOGENEOUS and len(ins) == 1 and relax:
            v = one(ins[0])
            relaxed.append((v, name, producer.get(v)))
            give(outs, [v])
            return
        fix(ins, f"{name}")
        ov = uf.new()
        pins.append((ov, f"{name}"))
        give(outs, [ov])

    def assign(target: torch.Tensor, value) -> None:
        """In-place writes (x[i] = y, x.copy_(y)): x takes y's scale; a number pins it."""
        if not target.is_floating_point():
            return
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            v = one(vars_of(value))
            uf.union(one(vars_of(target)), v)
        elif isinstance(value, (int, float)) and value != 0:
            fix([vars_of(target)], "assignment of a constant")

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = ops.op_name(func)
            if name == "__setitem__" and len(args) == 3 and isinstance(args[0], torch.Tensor):
                assign(args[0], args[2])
            out = func(*args, **kwargs)
            if name == "copy_" and len(args) >= 2 and isinstance(args[0], torch.Tensor):
                assign(args[0], args[1])
                return out
            outs = [t for t in ops.tensors_in(out) if t.is_floating_point()]
            if outs:
                fins = [t for t in ops.tensors_in((args, kwargs)) if t.is_floating_point()]
                rule(name, args, kwargs, fins, outs)
            return out

    with torch.no_grad():
        x = sample.clone()
        x.__dict__[_ATTR] = [uf.new()]
        pins.append((x.__dict__[_ATTR][0], "model input"))
        with Mode():
            y = model(x)
    for t in ops.tensors_in(y):
        for v in t.__dict__.get(_ATTR, []):
            pins.append((v, "model output"))
    # a relaxed activation must sit between two relaxed units (fc1 -> act -> fc2), or be a
    # factor of a product that feeds one (a GLU: act(gate) * value -> fc2)
    consumers = {uf.find(v) for u, v in unit_in.items() if u in relax}
    made = {uf.find(v) for v in unit_outs}
    glu = {p: fs for p, fs in factors.items() if uf.find(p) in consumers and len(fs) == 2
           and any(uf.find(f) in made for f in fs)}  # act(gate) * value, value a unit's
    consumers |= {uf.find(f) for fs in glu.values() for f in fs}
    kept = {}
    for v, act, unit in relaxed:
        if unit is not None and uf.find(v) in consumers:
            kept[v] = act
        else:
            pins.append((v, act))
    for t in keep:
        t.__dict__.pop(_ATTR, None)
    return _compact(uf, rows, pins, pvar, slices, unit_in, unit_out, norms, bn_stats, kept,
                    glu)


def _compact(uf, rows, pins, pvar, slices, unit_in, unit_out, norms, bn_stats, relaxed,
             factors) -> ScaleGraph:
    """Merge equal variables and renumber them densely."""
    index: dict[int, int] = {}

    def m(v: int) -> int:
        return index.setdefault(uf.find(v), len(index))

    param_var = {k: m(v) for k, v in pvar.items()}
    ins = {u: m(v) for u, v in unit_in.items()}
    outs = {u: m(v) for u, v in unit_out.items()}
    sites = [NormSite(m(v), kind, names, q, eps) for v, kind, names, q, eps in norms]
    stats = [(a, b, m(v), eps) for a, b, v, eps in bn_stats]
    relaxed = {m(v): act for v, act in relaxed.items()}
    used = set(ins.values())  # only the products that feed a unit are kept
    products = {m(p): [m(f) for f in fs] for p, fs in factors.items() if m(p) in used}
    out_rows = []
    for row in rows:
        merged: dict[int, float] = defaultdict(float)
        for v, c in row.items():
            merged[m(v)] += c
        merged = {k: c for k, c in merged.items() if c != 0}
        if merged:
            out_rows.append(merged)
    pin_reason: dict[int, str] = {}
    for v, why in pins:
        pin_reason.setdefault(m(v), why)
    out_rows += [{v: 1.0} for v in pin_reason]
    return ScaleGraph(nvars=max(1, len(index)), rows=out_rows, param_var=param_var,
                      slices=dict(slices), unit_in=ins, unit_out=outs, norms=sites,
                      batchnorm_stats=stats, pins=pin_reason, relaxed=relaxed,
                      products=products)
