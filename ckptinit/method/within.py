"""Within-layer step (the paper's Algorithm 1): every unit's outputs get mean beta and std 1.

With one calibration batch the whole step is a single forward pass: a pre-hook draws the
unit's weights from its real input, a forward hook measures its output, rewrites the unit
and hands the corrected output to the rest of the pass, so every unit is measured on the
outputs of final units below it. More batches add whole-network refinement passes whose
float64 statistics cover all images; depth never multiplies the cost (DESIGN 1.4).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..report import UnitRecord
from .stats import Moments
from .units import UnitScan, batchnorms, calibration_mode, channel_shape, removing

log = logging.getLogger(__name__)

DEAD_RTOL = 1e-5  # a channel whose std is below this fraction of the layer's median is dead


@dataclass
class WithinResult:
    passes: int
    max_deviation: float  # largest |std - 1| or |mean - beta| left on the calibration images
    batchnorms_reestimated: int


def _dead_mask(std: torch.Tensor) -> torch.Tensor:
    floor = max(1e-12, DEAD_RTOL * float(std.median())) if std.numel() else 1e-12
    return std <= floor


def _rewrite_(module: nn.Module, mean: torch.Tensor, std: torch.Tensor, beta: float):
    """W <- s W, b <- s (b - mu) + beta with s = 1/std (1 for dead channels).

    Returns the per-channel (scale, shift) so that the caller can correct an output in
    hand the same way: z' = s z + shift.
    """
    dead = _dead_mask(std)
    scale = torch.where(dead, torch.ones_like(std), 1.0 / std.clamp_min(1e-30))
    w = module.weight
    w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
    if module.bias is not None:
        shift = beta - scale * mean
        b = module.bias
        b.copy_((scale * b.double() + shift).to(b.dtype))
    else:
        shift = torch.zeros_like(mean)
    return scale, shift, dead


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def normalize_within_(
    model: nn.Module,
    scan: UnitScan,
    batches: Sequence[torch.Tensor],
    records: dict[str, UnitRecord],
    *,
    targets: set[str],
    draws: dict[str, str],
    beta: float = 0.1,
    draw_fn: Callable | None = None,
    max_passes: int = 5,
    tol: float = 1e-2,
) -> WithinResult:
    """Normalise the units named in `targets` in place; fill their records.

    `draws` maps a unit name to its weight draw ("keep" or a draw understood by `draw_fn`,
    which is called as draw_fn(module, input) before the unit is measured). BatchNorm
    layers that run after the first changed unit get fresh running statistics (cumulative
    average over all calibration images); the others are left bit for bit.
    """
    units = [u for u in scan.units if u.name in targets and not u.weight_standardized]
    for u in scan.units:
        if u.name in targets and u.weight_standardized:
            records[u.name].status = "skipped"
            records[u.name].note = "weight-standardized conv: its output scale ignores W"
    if not units:
        return WithinResult(0, 0.0, 0)
    first = units[0].order
    bns = batchnorms(model)
    reest = {n for n, o in scan.batchnorm_order.items() if o > first}
    saved = {n: copy.deepcopy(m.state_dict()) for n, m in bns.items() if n not in reest}
    momenta = {n: m.momentum for n, m in bns.items()}

    def reset_bn():
        for n in reest:
            bns[n].reset_running_stats()
            bns[n].momentum = None  # cumulative average over the pass

    try:
        with torch.no_grad(), calibration_mode(model, restore_batchnorm=False):
            reset_bn()
            _streaming_pass(model, units, batches, records, draws, beta, draw_fn)
            passes, deviation = 1, 0.0
            if len(batches) > 1:
                passes, deviation = _refine(model, units, batches, records, beta, max_passes, tol,
                                            reset_bn)
                passes += 1
    finally:
        for n, m in bns.items():
            m.momentum = momenta[n]
        for n, state in saved.items():
            bns[n].load_state_dict(state)
    return WithinResult(passes, deviation, len(reest))


def _streaming_pass(model, units, batches, records, draws, beta, draw_fn) -> None:
    """One pass over all batches; each unit is rewritten in its hook from the moments of
    every batch so far (earlier batches' moments follow the unit's own corrections
    exactly). With one batch this is the exact single-pass algorithm."""
    names = {u.module: u.name for u in units}
    acc: dict[str, Moments] = {}
    first_record: dict[str, tuple] = {}  # output statistics before any change
    total: dict[str, torch.Tensor] = {}  # per-channel scale applied so far
    seen: set[str] = set()  # units already called in the current batch
    handles = []

    def pre_hook(module, args):
        name = names[module]
        method = draws.get(name, "keep")
        if name in acc or name in seen or method == "keep":
            return
        result = draw_fn(module, args[0], method)
        if module.bias is not None:  # a new draw owes nothing to the old bias
            module.bias.zero_()
        rec = records[name]
        rec.draw = result.method
        rec.draw_reason = result.reason
        if result.method != result.requested:
            rec.status = "fallback"

    def hook(module, args, z):
        name = names[module]
        if name in seen:  # a unit called twice is measured on its first call
            return None
        seen.add(name)
        batch = Moments.of(z, _channel_dim(module))
        mom = acc[name] + batch if name in acc else batch
        if name not in first_record:
            first_record[name] = (batch.mean, batch.std)
        scale, shift, dead = _rewrite_(module, mom.mean, mom.std, beta)
        acc[name] = mom.affine(scale, shift)
        total[name] = total[name] * scale if name in total else scale
        shape = channel_shape(z, module)
        z = (z * scale.to(z.dtype).view(shape) + shift.to(z.dtype).view(shape)).contiguous()
        after = batch.affine(scale, shift)  # exact: z was corrected by this map
        mean0, std0 = first_record[name]
        _record(records[name], module, mean0, std0, after.mean, after.std, total[name], dead)
        return z

    for u in units:
        handles.append(u.module.register_forward_pre_hook(pre_hook))
        handles.append(u.module.register_forward_hook(hook))
    with removing(handles):
        for batch in batches:
            seen.clear()
            model(batch)


def measure_outputs(model: nn.Module, units: Sequence, batches: Sequence[torch.Tensor]) -> dict:
    """Per-channel output moments of each unit over all batches (first call of each unit).

    Runs in whatever mode the model is in; the caller chooses (calibration mode for fitting,
    eval mode for checking held-out statistics).
    """
    names = {u.module: u.name for u in units}
    moments: dict[str, Moments] = {}
    seen: set[str] = set()

    def hook(module, args, z):
        name = names[module]
        if name in seen:  # a unit called twice is measured on its first call
            return
        seen.add(name)
        m = Moments.of(z, _channel_dim(module))
        moments[name] = moments[name] + m if name in moments else m

    handles = [u.module.register_forward_hook(hook) for u in units]
    with removing(handles), torch.no_grad():
        for batch in batches:
            seen.clear()
            model(batch)
    return moments


def _refine(model, units, batches, records, beta, max_passes, tol, reset_bn) -> tuple[int, float]:
    """Whole-network passes over all batches until every unit is within tol of (beta, 1)."""
    deviation = math.inf
    for p in range(1, max_passes + 1):
        reset_bn()
        moments = measure_outputs(model, units, batches)
        deviation = 0.0
        for u in units:
            mean, std = moments[u.name].mean, moments[u.name].std
            live = ~_dead_mask(std)
            dev = (std[live] - 1).abs().max().item() if live.any() else 0.0
            if u.module.bias is not None and live.any():
                dev = max(dev, (mean[live] - beta).abs().max().item())
            deviation = max(deviation, dev)
            rec = records[u.name]
            rec.mean_after, rec.std_after = float(mean.mean()), float(std.mean())
        if deviation < tol:
            return p, deviation
        for u in units:
            mom = moments[u.name]
            scale, _, _ = _rewrite_(u.module, mom.mean, mom.std, beta)
            rec = records[u.name]
            rec.scale = (rec.scale or 1.0) * _geomean(scale)
    # corrections were applied after the last measurement: one more pass for BatchNorm
    reset_bn()
    for batch in batches:
        model(batch)
    log.warning("within-layer refinement stopped after %d passes (deviation %.3g)", p, deviation)
    return p + 1, deviation


def _geomean(x: torch.Tensor) -> float:
    return float(x.clamp_min(1e-30).log().mean().exp())


def _record(rec: UnitRecord, module, mean, std, after_mean, after_std, scale, dead) -> None:
    rec.mean_before, rec.std_before = float(mean.mean()), float(std.mean())
    rec.mean_after, rec.std_after = float(after_mean.mean()), float(after_std.mean())
    rec.scale = _geomean(scale)
    rec.dead = int(dead.sum())
    rec.action = f"{rec.draw}+normalize" if rec.draw and rec.draw != "keep" else "normalize"
    if rec.dead:
        rec.status = "dead"
        rec.note = f"{rec.dead} dead channel(s) left unscaled"
    if module.bias is None:
        rec.note = ((rec.note + "; ") if rec.note else "") + "no bias: mean kept"
