"""What follows each unit, as far as rescaling it is concerned.

A unit's scale can be undone only where something downstream forgets it: a norm layer,
a per-channel multiplier, or the next unit of a chain of positively homogeneous ops.
The data flow is recorded from one real forward pass with a TorchFunctionMode, so control
flow and functional code inside timm's modules are seen as they run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .units import Unit, calibration_mode, removing

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)
_HOMOGENEOUS = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "max_pool1d", "max_pool2d", "max_pool3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices", "flatten", "view", "reshape",
    "permute", "transpose", "contiguous", "mean", "dropout", "dropout1d", "dropout2d",
    "squeeze", "unsqueeze", "__getitem__", "clone", "float", "to", "identity", "_max_pool2d",
}
_MULTIPLY = {"mul", "mul_", "__mul__", "__rmul__"}


@dataclass
class Follower:
    """What a unit's output flows into, as far as rescaling is concerned.

    kind: "batchnorm" | "norm" (scalar-invariant LayerNorm/GroupNorm) | "multiplier"
    (a parameter that scales each channel) | "unit" (the next unit of a homogeneous chain)
    | "output" (the model output) | "blocked" (anything else: residual sums, GELU, gates).
    """

    kind: str
    target: str | None = None  # module or parameter name
    detail: str = ""


@dataclass
class _Node:
    name: str  # module name for leaves, op name otherwise
    leaf: nn.Module | None = None
    inputs: list = None  # producer nodes (None for constants and parameters)
    params: list = None  # parameter names this op reads (directly or through views)
    is_output: bool = False

    def __hash__(self):
        return id(self)


def trace_followers(model: nn.Module, sample: torch.Tensor, units: list[Unit]) -> dict:
    """Map each unit name to its Follower, from one forward pass on `sample`."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten

    unit_mods = {u.module: u.name for u in units}
    leaves = dict(unit_mods)
    for name, m in model.named_modules():
        if isinstance(m, (_BatchNorm, *NORM_TYPES)):
            leaves[m] = name
    param_names = {id(p): n for n, p in model.named_parameters()}
    producer: dict[int, _Node] = {}
    derived_param: dict[int, str] = {}  # tensor id -> parameter it is a view/reshape of
    alive: list = []
    nodes: list[_Node] = []
    depth = [0]

    def tensors(obj) -> list[torch.Tensor]:
        return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]

    def record(name, leaf, ins, outs) -> None:
        node = _Node(name, leaf, [], [])
        for t in ins:
            pname = param_names.get(id(t)) or derived_param.get(id(t))
            if pname is not None:
                node.params.append(pname)
            else:
                node.inputs.append(producer.get(id(t)))
        nodes.append(node)
        only_params = not node.inputs and node.params
        for t in outs:
            alive.append(t)
            if only_params and leaf is None:
                derived_param[id(t)] = node.params[0]
            else:
                producer[id(t)] = node

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if depth[0] == 0:
                outs = tensors(out)
                if outs:
                    name = getattr(func, "__name__", str(func))
                    record(name, None, tensors((args, kwargs)), outs)
            return out

    pending: dict = {}

    def pre(module, args, kwargs):
        if depth[0] == 0:
            pending[module] = tensors((args, kwargs))
        depth[0] += 1

    def post(module, args, kwargs, out):
        depth[0] -= 1
        if depth[0] == 0:
            record(leaves[module], module, pending.pop(module), tensors(out))

    handles = []
    for m in leaves:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    with removing(handles), torch.no_grad(), calibration_mode(model), Mode():
        out = model(sample)
    for t in tensors(out):
        if id(t) in producer:
            producer[id(t)].is_output = True

    consumers: dict[_Node, list[_Node]] = {}
    for node in nodes:
        for p in node.inputs:
            if p is not None:
                consumers.setdefault(p, []).append(node)
    unit_nodes = {}
    for node in nodes:  # first call of each unit
        if node.leaf in unit_mods and node.name not in unit_nodes:
            unit_nodes[node.name] = node
    return {name: _follow(node, consumers, unit_mods) for name, node in unit_nodes.items()}


def _follow(node: _Node, consumers: dict, unit_mods: dict) -> Follower:
    path = []
    current = node
    while True:
        outs = consumers.get(current, [])
        if current.is_output and not outs:
            return Follower("output", detail="model output")
        if len(outs) != 1 or current.is_output:
            return Follower("blocked", detail=f"output used {len(outs)} times" + (
                f" after {'/'.join(path)}" if path else ""))
        nxt = outs[0]
        if nxt.leaf is not None:
            if isinstance(nxt.leaf, _BatchNorm):
                return Follower("batchnorm", nxt.name)
            if isinstance(nxt.leaf, NORM_TYPES):
                return Follower("norm", nxt.name)
            if nxt.leaf in unit_mods:
                if len(nxt.inputs) != 1:
                    return Follower("blocked", detail=f"{nxt.name} has other inputs")
                return Follower("unit", nxt.name, "/".join(path))
            return Follower("blocked", detail=nxt.name)
        op = nxt.name
        if op in _MULTIPLY and len(nxt.inputs) == 1 and len(nxt.params) == 1:
            return Follower("multiplier", nxt.params[0])
        if op in _HOMOGENEOUS and len(nxt.inputs) == 1 and not nxt.params:
            path.append(op)
            current = nxt
            continue
        return Follower("blocked", detail=f"output goes through {op}")
