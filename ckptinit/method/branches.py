"""Residual branches that start at (nearly) zero, and a non-zero share for them on fresh nets.

timm zero-initialises the last BatchNorm weight of each ResNet block (`zero_init_last`) and
starts ConvNeXt's and LayerScale's gammas at 1e-6 to 1e-5. Such a branch adds nothing to
its stream, so at initialisation its units get no gradient and take no part in the
between-layer step (16 of resnet18's 21 units). `residual_init="data"` gives each such
multiplier the value 1/sqrt(n) for n zero-started branches: the within-layer step
normalises what the multiplier scales to std 1 on the calibration images, so every branch
then writes a depth-normalised share 1/sqrt(n) (the stream's variance grows by about a
factor e over the whole network, SkipInit/Fixup-style). `residual_init="timm"` keeps the
architecture's values.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import ops
from .units import calibration_mode

log = logging.getLogger(__name__)

ZERO = 1e-4  # a multiplier whose largest magnitude is below this starts its branch at zero
_VIEWS = {"reshape", "view", "unsqueeze", "expand", "expand_as", "to", "flatten", "squeeze",
          "__getitem__", "contiguous", "type_as"}


@torch.no_grad()
def zero_started_multipliers(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Parameters that multiply an activation (a norm's weight, a LayerScale gamma) and are
    all (nearly) zero, in the order the forward pass uses them."""
    params = {id(p): n for n, p in model.named_parameters()}
    derived: dict[int, str] = {}
    keep: list[torch.Tensor] = []
    found: list[str] = []

    def name_of(t) -> str | None:
        return params.get(id(t)) or derived.get(id(t))

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            fn = ops.op_name(func)
            ins = ops.tensors_in((args, kwargs))
            if fn in _VIEWS and ins and name_of(ins[0]) and isinstance(out, torch.Tensor):
                derived[id(out)] = name_of(ins[0])
                keep.append(out)
            elif fn in ops.MULTIPLY and len(ins) == 2:
                names = [name_of(t) for t in ins]
                if sum(n is not None for n in names) == 1:
                    found.append(next(n for n in names if n))
            elif fn in ops.NORMS:
                found.extend(n for t in ins[1:] if (n := params.get(id(t)))
                             and n.endswith("weight"))
            return out

    with torch.no_grad(), calibration_mode(model), Mode():  # BatchNorm's running stats kept
        model(sample)
    weights = dict(model.named_parameters())
    out = []
    for n in dict.fromkeys(found):
        p = weights[n]
        if p.numel() and p.is_floating_point() and float(p.detach().abs().max()) <= ZERO:
            out.append(n)
    return out


@torch.no_grad()
def share_residual_branches_(model: nn.Module, names: list[str]) -> float:
    """Set the named multipliers to 1/sqrt(len(names)); returns that share."""
    if not names:
        return 0.0
    share = 1.0 / math.sqrt(len(names))
    weights = dict(model.named_parameters())
    for n in names:
        weights[n].fill_(share)
    log.info("residual branches starting at zero: %d multipliers set to %.3g", len(names), share)
    return share
