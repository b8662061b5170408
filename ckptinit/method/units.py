"""Units (affine modules with a weight) in the order the forward pass calls them."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

UNIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Unit:
    """One affine module, identified by its qualified name."""

    name: str
    module: nn.Module
    order: int  # position of its first call in the forward pass
    calls: int = 1

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    @property
    def weight_standardized(self) -> bool:
        """timm's StdConv/ScaledStdConv normalise their weight in forward: scaling it is a no-op."""
        return "StdConv" in type(self.module).__name__


@dataclass
class UnitScan:
    """What one probing forward pass saw."""

    units: list[Unit]  # called units, in execution order
    never_called: list[str]  # units defined but not called (e.g. an unused head)
    batchnorm_order: dict[str, int]  # BN module name -> position among all leaf calls


@contextmanager
def removing(handles: list) -> Iterator[None]:
    """Hooks registered for one block of work, removed however the block ends."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def is_unit(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, UNIT_TYPES) and isinstance(w, torch.Tensor) and w.dim() >= 2


def batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


@contextmanager
def calibration_mode(model: nn.Module, restore_batchnorm: bool = True) -> Iterator[None]:
    """BatchNorm on batch statistics, dropout and drop-path off (eval), restored afterwards.

    Train-mode BatchNorm updates its running statistics on every pass; unless the caller
    means to keep them (the within-layer step re-estimates them), they are put back.
    """
    was_training = {m: m.training for m in model.modules()}
    saved = {m: copy.deepcopy(m.state_dict()) for m in batchnorms(model).values()} \
        if restore_batchnorm else {}
    model.eval()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    try:
        yield
    finally:
        for m, t in was_training.items():
            m.train(t)
        for m, state in saved.items():
            m.load_state_dict(state)


def scan_units(model: nn.Module, sample: torch.Tensor) -> UnitScan:
    """Run one small forward pass with hooks and list units in call order.

    Registration order is not execution order (timm builds heads before blocks in some
    models, and a module may be called twice), so the pass is the only reliable source.
    """
    candidates = {n: m for n, m in model.named_modules() if is_unit(m)}
    bns = batchnorms(model)
    seen: dict[str, Unit] = {}
    bn_order: dict[str, int] = {}
    counter = [0]
    handles = []

    def unit_hook(name: str):
        def hook(module, args):
            if name in seen:
                seen[name].calls += 1
            else:
                seen[name] = Unit(name, module, order=counter[0])
                counter[0] += 1

        return hook

    def bn_hook(name: str):
        def hook(module, args):
            if name not in bn_order:
                bn_order[name] = counter[0]
                counter[0] += 1

        return hook

    for name, m in candidates.items():
        handles.append(m.register_forward_pre_hook(unit_hook(name)))
    for name, m in bns.items():
        handles.append(m.register_forward_pre_hook(bn_hook(name)))
    with removing(handles), torch.no_grad(), calibration_mode(model):
        model(sample)
    units = sorted(seen.values(), key=lambda u: u.order)
    never = [n for n in candidates if n not in seen]
    if never:
        log.info("%d units are never called in the forward pass: %s", len(never), never[:5])
    return UnitScan(units=units, never_called=never, batchnorm_order=bn_order)


def channel_shape(z: torch.Tensor, module: nn.Module) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against the unit output."""
    if isinstance(module, nn.Linear):
        return (z.shape[-1],)
    return (1, z.shape[1]) + (1,) * (z.dim() - 2)


# --- what follows each unit -------------------------------------------------------------
# A unit's scale can be undone only where something downstream forgets it: a norm layer,
# a per-channel multiplier, or the next unit of a chain of positively homogeneous ops.
# The data flow is recorded from one real forward pass with a TorchFunctionMode, so control
# flow and functional code inside timm's modules are seen as they run.

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
