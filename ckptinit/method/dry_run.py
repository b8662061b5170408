"""`--dry-run`: what `rescale` would do to every unit, and what it would cost, without doing it.

The same decisions as the run, taken from one small pass on random inputs at the model's
input size: the units in call order (units.scan_units), the draws of the within-layer step
(RescaleOptions.within_draws), the between-layer plan (moves.plan_moves: pinned units and
why, q/k balancing, what compensates each move), units without gradient (one backward of
the change rates' loss), and the passes and memory (cost.py). The model is left as found.
The run itself plans on calibration images after the within-layer step, so what depends on
statistics (a norm whose input variance is near its eps, a dead unit) may differ.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, replace

import torch
from torch import nn

from .. import __version__
from ..device import one_thread
from ..options import RescaleOptions
from ..report import DryRunPlan, UnitPlan
from .cost import (
    SCAN_IMAGES,
    Footprint,
    estimate_memory,
    estimate_passes,
    measure_footprint,
)
from .moves import Plan, plan_moves
from .units import Unit, calibration_mode, called_units, removing, scan_units

log = logging.getLogger(__name__)

DATA_DRAWS = ("pca", "kmeans")  # draws that need at least as many input rows as outputs
RELEASED = "released by --allow-function-change: its move changes the function"


def dry_run(
    model: nn.Module,
    input_size: tuple[int, ...],
    options: RescaleOptions | None = None,
    *,
    fresh: set[str] | None = None,
    images: int = 64,
    holdout: int = 16,
) -> DryRunPlan:
    """The plan of `rescale(model, images, options, fresh=fresh)` for `images` calibration
    and `holdout` held-out images of shape `input_size` (C, H, W); nothing is changed."""
    options = (options or RescaleOptions()).check()
    t0 = time.perf_counter()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(options.seed)
    # two images for every pass (the run traces four; the plan's structure is the same)
    sample = torch.randn(SCAN_IMAGES, *input_size, generator=gen).to(device)
    # small passes: spinning threads cost more than they give; BatchNorm statistics and
    # train/eval modes are put back (the residual-branch search runs in the caller's mode)
    with one_thread(device), calibration_mode(model), called_units(model):
        scan = scan_units(model, sample)
        names = [u.name for u in scan.units]
        fresh_set = set(names) if fresh is None else set(fresh)
        options = replace(options, grad_batches=options.draws(not fresh_set >= set(names)))
        draws = options.within_draws(names, fresh_set)
        share = options.residual_init == "data" and fresh_set >= set(names)
        with _branches_shared(model, sample if share else None) as zero_started:
            fp = measure_footprint(model, scan.units, sample, options.seed)
            plan, traces = _plan(model, scan.units, sample, fresh_set, options)
    batch = min(options.batch_size, images)
    units = [_unit_plan(u, u.name in fresh_set, draws, plan, fp, options, batch)
             for u in scan.units]
    result = DryRunPlan(version=__version__, options=asdict(options), units=units,
                        never_called=scan.never_called)
    result.passes = estimate_passes(
        options, images=images, holdout=holdout, within=any(u.within for u in units),
        share_branches=share, renormalise=bool(plan and plan.renormalise),
        approximate=bool(plan and plan.approximate), traces=traces)
    result.memory = estimate_memory(model, scan.units, fp, options, images=images,
                                    holdout=holdout, patch_bytes=_patch_bytes(scan.units, draws,
                                                                              fp, options))
    result.data = {"images": images, "holdout": holdout, "batch_size": options.batch_size,
                   "batches": -(-images // options.batch_size),
                   "input_size": list(input_size)}
    result.notes += _notes(plan, zero_started, fp, scan.units)
    result.timings["plan"] = time.perf_counter() - t0
    return result


def _plan(model: nn.Module, units: list[Unit], sample: torch.Tensor, fresh: set[str],
          options: RescaleOptions) -> tuple[Plan | None, int]:
    """The between-layer plan as the run makes it, and the forward passes it took (the
    run's trace takes as many: one more round with --allow-function-change and pins)."""
    if not options.between:
        return None, 0
    calls = [0]
    hook = model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    with removing([hook]):
        plan = plan_moves(model, units, sample, fresh, options.allow_function_change)
    return plan, calls[0]


@contextmanager
def _branches_shared(model: nn.Module, sample: torch.Tensor | None):
    """What the run does to zero-started residual branches of a fresh net (branches.py),
    for the length of the plan; the multipliers are put back after. Yields their names."""
    from .branches import share_residual_branches_, zero_started_multipliers

    names = zero_started_multipliers(model, sample) if sample is not None else []
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    share_residual_branches_(model, names)
    try:
        yield names
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


def _unit_plan(u: Unit, fresh: bool, draws: dict[str, str], plan: Plan | None, fp: Footprint,
               options: RescaleOptions, batch: int) -> UnitPlan:
    draw = draws.get(u.name)
    rec = UnitPlan(name=u.name, kind=u.kind, shape=u.shape, calls=u.calls,
                   origin="fresh" if fresh else "loaded",
                   draw=draw if draw not in (None, "keep") else "timm init" if fresh else "kept")
    if draw is not None:
        rec.within = not u.weight_standardized
        if u.weight_standardized:
            rec.within_note = "skipped: weight-standardized conv (its output scale ignores W)"
        elif getattr(u.module, "bias", None) is None:
            rec.within_note = "no bias: mean kept"
    if draw in DATA_DRAWS:
        rec.draw_note = _fallback(u, fp.rows.get(u.name, 0) * batch, options.patch_budget)
    if plan is None:
        return rec
    k = plan.slices[u.name]
    last = (u.name, k - 1)
    rec.compensation = plan.compensation.get(u.name)
    if last in plan.pinned:
        rec.between, rec.reason, rec.compensation = "pinned", plan.pinned[last], None
    elif u.name in fp.zero_grad:
        rec.between, rec.reason = "excluded", "zero gradient (on random inputs)"
    elif last in plan.pair_reason:
        rec.between, rec.reason = "balanced", plan.pair_reason[last]
    else:
        rec.between = "movable"
        if u.name in plan.renormalise:
            rec.reason = "its input moves through an activation: re-normalised after"
        elif plan.graph.unit_out.get(u.name) in plan.graph.relaxed:
            rec.reason = "moves through the activation after it (fresh units; approximate)"
        elif u.name in plan.approximate:
            rec.reason = RELEASED
    if k > 1:
        names = plan.labels[u.name]
        rec.slices = [{"slice": names[s], "status": "pinned" if (u.name, s) in plan.pinned
                       else "balanced" if (u.name, s) in plan.balanced else "movable",
                       "reason": plan.pinned.get((u.name, s))} for s in range(k)]
        if rec.between == "movable" and any(s["status"] == "balanced" for s in rec.slices):
            rec.reason = "q/k balanced (attention temperature kept)"
    return rec


def _fallback(u: Unit, rows: int, budget: int) -> str | None:
    """The fallback draws.py would take: fewer input rows than outputs per group."""
    groups = getattr(u.module, "groups", 1)
    k = u.shape[0] // groups
    n = min(rows, budget)
    if n >= k:
        return None
    why = f"patch budget ({n}) below outputs ({k})" if rows >= k else \
        f"fewer input rows ({n}) than outputs ({k})"
    return f"falls back to gaussian: {why}"


def _patch_bytes(units: list[Unit], draws: dict[str, str], fp: Footprint,
                 options: RescaleOptions) -> int:
    """The largest patch matrix a data-dependent draw gathers (float32, plus its centred
    copy and the dim x dim covariance in float64)."""
    largest = 0
    batch = options.batch_size
    for u in units:
        if draws.get(u.name) not in DATA_DRAWS:
            continue
        dim = int(torch.tensor(u.shape[1:]).prod())
        groups = getattr(u.module, "groups", 1)
        n = min(fp.rows.get(u.name, 0) * batch, options.patch_budget)
        largest = max(largest, groups * (2 * n * dim * 4 + dim * dim * 8))
    return largest


def _notes(plan: Plan | None, zero_started: list[str], fp: Footprint,
           units: list[Unit]) -> list[str]:
    notes = []
    if zero_started:
        notes.append(f"residual branches: {len(zero_started)} start at zero; their multipliers "
                     f"would be set to 1/sqrt({len(zero_started)}) (--residual-init timm keeps "
                     "them)")
    excluded = [u.name for u in units if u.name in fp.zero_grad]
    if excluded:
        notes.append(f"{len(excluded)} unit(s) get no gradient and would take no part in the "
                     "between-layer step")
    if plan is not None and not plan.eps_exact:
        notes.append("fresh net with LayerNorm/GroupNorm: a norm's eps may take a small share "
                     "of a move, so the function check is not enforced")
    notes.append("planned on random inputs before the within-layer step; the run plans on "
                 "calibration images after it, so pins from a norm's eps or dead units may "
                 "differ")
    return notes
