"""Units (affine modules with a weight) in the order the forward pass calls them."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .._helpers import listing
from .ops import AFFINE, MULTIPLY

log = logging.getLogger(__name__)

UNIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# a unit's output through these (and view-like ops or a constant shift) is a gate's logit when
# the result then multiplies a larger tensor: squeeze-excite, ECA, CBAM, GC blocks
_GATE_OPS = frozenset({"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "relu6",
                       "hardtanh", "hardtanh_", "clamp", "clip"})
_VIEW_OPS = frozenset({"view", "reshape", "flatten", "unsqueeze", "squeeze", "expand",
                       "expand_as", "contiguous", "to", "float", "permute", "transpose"})
_JOIN_OPS = frozenset({"cat", "concat", "concatenate"})
_SHIFT_OPS = frozenset({"add", "__add__", "__radd__", "sub", "__sub__", "div", "__truediv__"})


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
    gates: set[str] = field(default_factory=set)  # units whose output is a gate's logit
    outputs: set[str] = field(default_factory=set)  # units whose output is the model's
    # units with one weight per output channel whose output goes straight into a BatchNorm:
    # train mode normalises that weight away, so their gradient is round-off (FastViT's and
    # MobileOne's 1x1 depthwise scale branches)
    scale_free: set[str] = field(default_factory=set)
    # never called, but their weight is used by functional code (F.linear(x, m.weight));
    # no hook sees them (timm's EVA/BEiT/SwinV2 qkv is made a called unit: called_units)
    functional: list[str] = field(default_factory=list)
    # units whose weight something else uses too (another unit, functional code): a change
    # to one of them reaches places the call order does not show
    shared: set[str] = field(default_factory=set)


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


@contextmanager
def called_units(model: nn.Module) -> Iterator[list[str]]:
    """Make timm's functional qkv projections called modules for the duration of a run.

    timm's EVA, BEiT and SwinV2 attention with separate q/v biases computes
    `F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))`: `qkv` is never called, so
    no hook sees its output, and the within-layer step and the rates cannot see the unit.
    Their own `qkv_bias_separate` flag computes the same function as `qkv(x) + bias` (the
    unit is then bias-free; the biases stay separate parameters). The flag is not part of
    the state dict, so the written checkpoint is unchanged; it is put back afterwards.
    Yields the names of the attention modules switched.
    """
    switched = [(n, m) for n, m in model.named_modules()
                if getattr(m, "qkv_bias_separate", True) is False
                and isinstance(getattr(m, "qkv", None), nn.Linear) and m.qkv.bias is None
                and getattr(m, "q_bias", None) is not None]
    for _, m in switched:
        m.qkv_bias_separate = True
    if switched:
        log.info("%d attention module(s) call their qkv projection for this run (%s)",
                 len(switched), listing([n for n, _ in switched], 3))
    try:
        yield [n for n, _ in switched]
    finally:
        for _, m in switched:
            m.qkv_bias_separate = False


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
    depthwise: dict[str, tuple[int, ...]] = {}  # one input channel per group: input shape

    def unit_hook(name: str):
        def hook(module, args):
            flow.active.append(name)
            if name in seen:
                seen[name].calls += 1
            else:
                seen[name] = Unit(name, module, order=counter[0])
                counter[0] += 1
                w = module.weight
                if w.dim() > 2 and w.shape[1] == 1 and w[0].numel() > 1 and args and \
                        isinstance(args[0], torch.Tensor):
                    depthwise[name] = tuple(args[0].shape)

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
    flow = _FlowFinder({id(m.weight): n for n, m in candidates.items()})
    for name, m in candidates.items():
        handles.append(m.register_forward_hook(flow.unit_hook(name)))
    with removing(handles), torch.no_grad(), calibration_mode(model), flow:
        out = model(sample)
    heads = {flow.get(flow.logits, t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
    units = sorted(seen.values(), key=lambda u: u.order)
    never = [n for n in candidates if n not in seen]
    if never:
        log.info("%d units are never called in the forward pass: %s", len(never), never[:5])
    scale_free = {u.name for u in units if u.name in flow.batch_normed
                  and (u.module.weight[0].numel() == 1 or u.name in depthwise
                       and weights_reading_data(u.module, depthwise[u.name]) == 1)}
    called = {id(u.module.weight) for u in units}  # a weight tied to a called unit is seen
    functional = [n for n in never if id(candidates[n].weight) in flow.weights_used
                  and id(candidates[n].weight) not in called]
    if functional:
        log.warning("%d unit(s) are used through their weight by functional code, not "
                    "called (%s): no step can see their outputs, so they are left as they "
                    "are and what they feed cannot move", len(functional),
                    listing(functional, 3))
    owners: dict[int, list[str]] = {}
    for u in units:
        owners.setdefault(id(u.module.weight), []).append(u.name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    return UnitScan(units=units, never_called=never, batchnorm_order=bn_order,
                    gates=flow.gates, outputs=heads - {None}, scale_free=scale_free,
                    functional=functional, shared=shared | flow.used_elsewhere)


def weights_reading_data(module: nn.Module, shape: tuple[int, ...]) -> int:
    """How many weights of an output channel of a conv with one input channel per group
    ever multiply an input value, on inputs of `shape`: a tap that only meets zero padding
    reads nothing (a 3x3 depthwise conv on a 1x1 map has one weight per channel that does:
    efficientnet_b0's last stage at 32 px). Channel c gets a one-hot kernel at tap
    c mod taps, on an image of ones: the tap reads data where that channel's output is not
    zero. One conv forward (more only with fewer channels than taps)."""
    w = module.weight
    out_ch, taps = w.shape[0], w[0].numel()
    channel = torch.arange(out_ch, device=w.device)
    probe = torch.ones((1, *shape[1:]), dtype=w.dtype, device=w.device)
    params = {} if module.bias is None else {"bias": torch.zeros_like(module.bias)}
    reading: set[int] = set()
    for start in range(0, taps, out_ch):
        tap = (channel + start) % taps
        kernel = torch.zeros(out_ch, taps, dtype=w.dtype, device=w.device)
        kernel[channel, tap] = 1
        try:
            with torch.no_grad():
                out = torch.func.functional_call(
                    module, {**params, "weight": kernel.view_as(w)}, (probe,))
        except (RuntimeError, TypeError) as e:  # a unit that wants more than its input
            log.debug("could not probe %s: %s", type(module).__name__, e)
            return taps
        hit = out.detach().flatten(2).abs().amax(2)[0] > 0
        reading.update(tap[hit].tolist())
    return len(reading)


class _FlowFinder(TorchFunctionMode):
    """Follows unit outputs through one pass (by identity, while the pass holds them),
    through view-like ops and constant shifts only. A unit whose output then goes through a
    sigmoid-like op into a product that broadcasts it over a larger tensor is a gate's logit
    (squeeze-excite, ECA, CBAM; not a GLU, whose gate has the features' own shape); one
    whose output is the model's output is a head."""

    def __init__(self, unit_weights: dict[int, str]) -> None:
        super().__init__()
        self.unit_weights = unit_weights  # id of a unit's weight -> the unit
        self.active: list[str] = []  # the units whose forward is running, innermost last
        self.used_elsewhere: set[str] = set()  # units whose weight an op outside them used
        self.logits: dict[int, tuple[torch.Tensor, str]] = {}
        self.gated: dict[int, tuple[torch.Tensor, tuple[str, int]]] = {}  # unit, gate numel
        self.gates: set[str] = set()
        self.batch_normed: set[str] = set()  # units whose output a BatchNorm normalises
        self.weights_used: set[int] = set()  # ids of the weights linear/conv ops were given
        # unit outputs joined along channels (timm's MixedConv2d): every channel stays one
        # unit's, so a BatchNorm of the join normalises each of them
        self.joined: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def unit_hook(self, name: str):
        def hook(module, args, out):
            if self.active and self.active[-1] == name:
                self.active.pop()
            if isinstance(out, torch.Tensor):
                self.logits[id(out)] = (out, name)

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in AFFINE:
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            self.weights_used.add(id(weight))
            owner = self.unit_weights.get(id(weight))
            if owner is not None and (not self.active or self.active[-1] != owner):
                self.used_elsewhere.add(owner)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in _JOIN_OPS and isinstance(out, torch.Tensor) and out.dim() > 1 and args:
            dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else 0)
            parts = [self.get(self.logits, t) for t in args[0]]
            if isinstance(dim, int) and dim % out.dim() == 1 and parts and all(parts):
                self.joined[id(out)] = (out, parts)
        if not tensors or not isinstance(out, torch.Tensor):
            return out
        passes = name in _VIEW_OPS or (name in _SHIFT_OPS and len(tensors) == 1)
        unit = self.get(self.logits, tensors[0])
        if unit is not None and name == "batch_norm":
            self.batch_normed.add(unit)
        if name == "batch_norm":
            self.batch_normed.update(self.get(self.joined, tensors[0]) or ())
        if unit is not None and name in _GATE_OPS:
            self.gated[id(out)] = (out, (unit, out.numel()))
        elif unit is not None and passes:
            self.logits[id(out)] = (out, unit)
        gate = self.get(self.gated, tensors[0])
        if gate is not None and passes:
            self.gated[id(out)] = (out, gate)
        if name in MULTIPLY and len(tensors) == 2:
            a, b = (self.get(self.gated, t) for t in tensors)
            if (a is None) != (b is None):  # a gate times the features it gates
                unit, numel = a or b
                if numel < max(t.numel() for t in tensors):
                    self.gates.add(unit)
        return out

    @staticmethod
    def get(table: dict, t: torch.Tensor):
        hit = table.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None


def channel_shape(z: torch.Tensor, module: nn.Module) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against the unit output."""
    if isinstance(module, nn.Linear):
        return (z.shape[-1],)
    return (1, z.shape[1]) + (1,) * (z.dim() - 2)
