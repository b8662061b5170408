"""The library entry points: `rescale` and `measure` on any nn.Module and a tensor of images."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, fields, replace

import torch
from torch import nn

from . import __version__
from ._helpers import listing
from .data.batches import BatchesLike, as_batches, first_images
from .device import (
    on_device,
    one_thread,
    precision,
    resolve_device,  # noqa: F401  (public here too: ckptinit.api.resolve_device)
)
from .errors import UsageError
from .layout import memory_layout
from .method.heldout import check_heldout, measure_heldout_rates
from .method.units import called_units, scan_units
from .method.within import normalize_within_
from .options import (
    RescaleOptions,
)
from .report import RunReport, UnitRecord

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
HOLDOUT_FALLBACK = 16  # calibration images the held-out checks use when none are held out
SAMPLE_IMAGES = 4  # the first images: unit scan, tracing, residual branches (every rank)


def _batches(images: BatchesLike, batch_size: int, device: torch.device):
    """The calibration images as batches on `device`, streamed (never all on the device)."""
    if isinstance(images, torch.Tensor) and (images.dim() != 4 or images.shape[0] == 0):
        raise UsageError(f"Calibration images must be a non-empty (N, C, H, W) tensor, got "
                         f"{tuple(images.shape)}.")
    batches = as_batches(images, batch_size, device)
    if not len(batches):
        raise UsageError("Calibration images must hold at least one batch; got none.")
    return batches


def with_draws(options: RescaleOptions, units, fresh: set[str]) -> RescaleOptions:
    """`options` with its gradient draws decided (RescaleOptions.draws), so that the report
    and the metadata say how many were used."""
    loaded = any(u.name not in fresh for u in units)
    return replace(options, grad_batches=options.draws(loaded))


def _new_report(command: str, options: RescaleOptions, scan) -> tuple[RunReport, dict]:
    """A report with one record per unit, and the records by unit name."""
    report = RunReport(version=__version__, command=command, options=asdict(options),
                       never_called=scan.never_called)
    report.units = [
        UnitRecord(name=u.name, kind=u.kind, shape=u.shape, calls=u.calls) for u in scan.units
    ]
    return report, {r.name: r for r in report.units}


def rescale(
    model: nn.Module,
    images: BatchesLike,
    options: RescaleOptions | None = None,
    *,
    fresh: Iterable[str] | None = None,
    holdout: BatchesLike | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, RunReport]:
    """Data-dependent initialisation of `model` in place; returns the model and the report.

    `images` is an (N, C, H, W) tensor (batched by `options.batch_size`) or a re-iterable
    stream of batches (`ckptinit.data.batches.Batches`, e.g. `CalibrationSet.batches()`).
    `fresh` names the units (module names) whose weights are new rather than loaded; None
    means every unit is fresh, as for a model just built. By default (DESIGN 1.3) fresh
    units get a Gaussian draw and the within-layer step, loaded units keep their weights.
    `holdout` images (never used for fitting) serve the checks; without them the
    calibration images are used. With `device="auto"` the model stays where it is; the
    global random generators are not touched (every draw has its own seeded generator).
    With `options.memory_format="auto"` the passes run channels-last for conv nets on the
    CPU (ckptinit.layout); the model comes back with its tensors in the layout they had.
    """
    options = (options or RescaleOptions()).check()
    with on_device(model, options.device) as run, _batchnorm_needs_a_batch(), \
            memory_layout(model, run.device, options.memory_format), called_units(model):
        report = _rescale(model, images, options, run.device, fresh, holdout, progress)
        report.resources = run.resources()
    return model, report


@contextmanager
def _batchnorm_needs_a_batch():
    """BatchNorm on batch statistics cannot run on one value per channel (a batch of one
    image reaching a 1x1 map): say which option fixes it, not torch's ValueError."""
    try:
        yield
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise UsageError("BatchNorm needs more than one value per channel in a batch, and "
                         "a batch reached a 1x1 feature map with one image: use "
                         "--batch-size 2 or more (or a larger --input-size).") from e


def _rescale(model, images, options, device, fresh, holdout, progress) -> RunReport:
    note = progress or (lambda msg: None)
    t0 = time.perf_counter()
    batches = _batches(images, options.batch_size, device)
    sample = first_images(batches, SAMPLE_IMAGES)
    with one_thread(device):  # the 2-image probes: threads cost more than they give
        scan = scan_units(model, sample[:2])
    fresh_set = {u.name for u in scan.units} if fresh is None else set(fresh)
    options = with_draws(options, scan.units, fresh_set)
    report, records = _new_report("rescale", options, scan)
    report.timings["scan"] = time.perf_counter() - t0

    draws = options.within_draws([u.name for u in scan.units], fresh_set)
    targets = set(draws)
    for name in fresh_set & set(records):
        records[name].note = "fresh"
    if options.residual_init == "data" and fresh_set >= {u.name for u in scan.units}:
        with one_thread(device):
            _share_branches(model, sample, report)
    if targets:
        t = time.perf_counter()
        note(f"within-layer step on {len(targets)} units")
        generator = torch.Generator(device=device).manual_seed(options.seed)

        def draw_fn(module, x, method):
            from .method.draws import draw_weight_

            return draw_weight_(module, x, method, generator, options.patch_budget)

        result = normalize_within_(
            model, scan, batches, records, targets=targets, draws=draws, beta=options.beta,
            head_std=options.head_std,
            draw_fn=draw_fn, tol=options.tol,
        )
        report.within_passes = result.passes
        report.within_correction = result.max_correction
        report.notes.append(
            f"within-layer: {len(targets)} units normalised in {result.passes} forward pass(es)"
            + (f" (largest correction in the last pass {result.max_correction:.2g})"
               if result.passes > 1 else "")
            + f"; {result.batchnorms_reestimated} BatchNorm layers re-estimated"
        )
        report.timings["within"] = time.perf_counter() - t
    else:
        report.notes.append("within-layer step skipped")
    held = holdout is not None and len(holdout) > 0
    holdout_batches = _batches(holdout, options.batch_size, device) if held else batches
    if options.between:
        with precision(device, tf32=False):  # its function check compares outputs to 1e-4
            plan = _between(model, scan, batches, holdout_batches, report, options, fresh_set,
                            note, sample)
            if held and options.optimizer == "sgd":  # Adam's rates need no gradient
                t = time.perf_counter()
                note("change rates on the held-out images")
                measure_heldout_rates(model, plan.units, holdout_batches, report.units,
                                      options.grad_batches, options.seed, plan.slices)
                report.timings["heldout_rates"] = time.perf_counter() - t
    else:
        report.notes.append("between-layer step skipped")
    if not held:  # a check, not a second pass over everything
        holdout_batches = [first_images(batches, HOLDOUT_FALLBACK)]
        report.notes.append(f"no held-out images given: output_std and std_heldout are "
                            f"measured on the first {holdout_batches[0].shape[0]} "
                            "calibration images")
    check_heldout(model, scan.units, holdout_batches, report, options.head_std,
                  drawn=bool(targets) and any(d != "keep" for d in draws.values()))
    _never_called_notes(scan, report)
    report.timings["total"] = time.perf_counter() - t0
    _undefined_to_none(report)
    return report


def _never_called_notes(scan, report) -> None:
    functional = set(scan.functional)
    idle = [n for n in scan.never_called if n not in functional]
    if idle:
        report.notes.append(f"{len(idle)} unit(s) never called in the forward pass, left as "
                            f"they are: {', '.join(idle[:5])}")
    if functional:
        report.notes.append(
            f"WARNING: {len(functional)} unit(s) are used through their weight by functional "
            f"code, not called ({listing(scan.functional, 3)}: F.linear(x, unit.weight) or "
            "the like): no step sees their outputs, so they "
            "keep timm's init and the units they feed cannot move (tied): the result may "
            "be a worse start than timm's init; compare with `ckptinit measure`")


def _share_branches(model, sample, report) -> None:
    from .method.branches import share_residual_branches_, zero_started_multipliers

    names = zero_started_multipliers(model, sample[:2])
    if names:
        share = share_residual_branches_(model, names)
        report.notes.append(
            f"residual branches: {len(names)} started at zero; their multipliers set to "
            f"{share:.3g} = 1/sqrt({len(names)}) so that every unit takes part "
            "(--residual-init timm keeps them)")


def _between(model, scan, batches, holdout, report, options, fresh, note, sample):
    """The between-layer step and its report line; returns the plan of moves it used."""
    from .method.between import rescale_between_
    from .method.moves import plan_moves

    t = time.perf_counter()
    note("tracing the data flow")
    plan = plan_moves(model, scan.units, sample, fresh, options.allow_function_change)
    records = {r.name: r for r in report.units}
    result = rescale_between_(
        model, plan, batches, holdout, records, batchnorm_order=scan.batchnorm_order,
        grad_batches=options.grad_batches, damping=options.damping, tol=options.tol,
        iters=options.iters, seed=options.seed, function_tol=options.function_tol,
        optimizer=options.optimizer, scale_free=scan.scale_free, progress=note,
    )
    report.between_iterations = result.iterations
    report.converged = result.converged
    report.function_check = result.check
    report.rate_floor, report.rate_floor_units = result.floor, result.floor_units
    _warn_if_the_target_moved(result, report, options.optimizer)
    counts = {s: sum(u.between_status == s for u in report.units)
              for s in ("pinned", "excluded", "tied", "limited", "balanced")}
    spread_b, spread_a = (_g(report.rate_spread(w)) for w in ("before", "after"))
    rate = "lr/RMS(W) (Adam)" if options.optimizer == "adam" else "change rate"
    free = any(u.between_status in ("ok", "not converged") for u in report.units)
    held = any(u.between_status == "limited" for u in report.units)
    outcome = (f"{'converged' if result.converged else 'NOT converged'} within "
               f"{options.tol:.0%}") if free else \
        "every movable unit held back by a bound" if held else "no unit was free to move"
    report.notes.append(
        f"between-layer: {result.iterations} iteration(s), {outcome}; "
        f"{rate} spread (max/min, movable units) {spread_b} -> {spread_a}; "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + (f"; {result.batchnorms_reestimated} BatchNorm layers re-estimated"
           if result.batchnorms_reestimated else "")
        + (f"; no function-preserving move brings it below {_g(result.floor)}: "
           f"{len(result.floor_units)} units move only together "
           f"({listing(result.floor_units, 3)})"
           if result.floor is not None and result.floor > 1 + options.tol else "")
    )
    report.timings["between"] = time.perf_counter() - t
    return plan


TARGET_DRIFT = 100.0  # a common rate this many times off the starting rates' mean


def _warn_if_the_target_moved(result, report, optimizer: str) -> None:
    """The common rate should land near the median of the starting rates. Far from it,
    most weights were rescaled a lot: the sign of units that cannot move (a weight a norm
    normalises away, whose rate is round-off) dragging the target with them, as
    efficientnet_b0's depthwise convs on 1x1 maps once did, silently."""
    if not result.start or not result.target:
        return
    drift = result.target / result.start
    if 1 / TARGET_DRIFT <= drift <= TARGET_DRIFT:
        return
    power = 1.0 if optimizer == "adam" else 0.5  # SGD's rate goes as 1/||W||^2
    msg = (f"the common change rate ended {drift:.2g} times the median starting rate, so "
           f"most weights were rescaled by about {drift ** -power:.2g}x: "
           "units that cannot move (a weight a norm normalises away has a round-off rate) "
           "may have dragged it; check the per-unit table for units far from the rest")
    log.warning(msg[0].upper() + msg[1:] + ".")
    report.notes.append("WARNING: " + msg)


def _g(value: float | None) -> str:
    return f"{value:.3g}" if value is not None and math.isfinite(value) else "n/a"


def _undefined_to_none(report: RunReport) -> None:
    """A number the method could not define (the change rate of an all-zero unit is 0/0)
    is reported as None, never as NaN or Inf (which JSON cannot hold)."""
    for record in report.units:
        for f in fields(record):
            value = getattr(record, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                setattr(record, f.name, None)


def measure(
    model: nn.Module,
    images: BatchesLike,
    options: RescaleOptions | None = None,
    *,
    fresh: Iterable[str] | None = (),
) -> RunReport:
    """Per-unit output statistics and change rates, without changing the model.

    Statistics are taken as the within-layer step would see them (BatchNorm on batch
    statistics, dropout off); the compensation column says what the between-layer step
    could do with each unit. `images` as for `rescale`.
    """
    options = (options or RescaleOptions()).check()
    with on_device(model, options.device) as run, \
            memory_layout(model, run.device, options.memory_format), called_units(model):
        report = _measure(model, images, options, run.device, fresh)
        report.resources = run.resources()
    return report


def _measure(model, images, options, device, fresh) -> RunReport:
    from .method.between import SCALE_FREE, confirmed_scale_free
    from .method.moves import plan_moves
    from .method.rates import estimate_rates
    from .method.units import calibration_mode
    from .method.within import measure_outputs

    t0 = time.perf_counter()
    batches = _batches(images, options.batch_size, device)
    sample = first_images(batches, SAMPLE_IMAGES)
    with one_thread(device):  # as in rescale: the 2-image probe
        scan = scan_units(model, sample[:2])
    fresh_set = {u.name for u in scan.units} if fresh is None else set(fresh)
    options = with_draws(options, scan.units, fresh_set)
    report, records = _new_report("measure", options, scan)
    with calibration_mode(model):
        moments = measure_outputs(model, scan.units, batches)
    for u in scan.units:
        m = moments[u.name]
        records[u.name].mean_before = float(m.mean.mean())
        records[u.name].std_before = float(m.std.mean())
    plan = plan_moves(model, scan.units, sample, fresh_set, options.allow_function_change)
    rates = estimate_rates(model, scan.units, batches, options.grad_batches, options.seed,
                           plan.slices)
    scale_free = confirmed_scale_free(scan.scale_free, rates.log_rates())
    for u in scan.units:
        rec = records[u.name]
        rec.rate_before = rates.rate(u.name)
        rec.compensation = plan.compensation.get(u.name, "-")
        key = (u.name, plan.slices[u.name] - 1)
        if key in plan.pinned:
            rec.between_status, rec.between_reason = "pinned", plan.pinned[key]
        elif key in scale_free:
            rec.between_status, rec.between_reason = "excluded", SCALE_FREE
        elif not rec.rate_before > 0:
            rec.between_status, rec.between_reason = "excluded", "zero gradient"
        elif key in plan.pair_reason:
            rec.between_status, rec.between_reason = "balanced", plan.pair_reason[key]
        else:
            rec.between_status = "ok"
        if plan.slices[u.name] > 1:
            rec.slices = [{"slice": plan.labels[u.name][s],
                           "rate_before": r, "status": "pinned" if (u.name, s) in plan.pinned
                           else "balanced" if (u.name, s) in plan.balanced else "ok"}
                          for s, r in enumerate(rates.slice_rates(u.name))]
    spread = report.rate_spread("before", movable_only=False)
    report.notes.append(
        f"change rates spread over {spread:.3g}x (max/min over units with gradient)"
        if spread else "no unit receives gradient")
    report.timings["total"] = time.perf_counter() - t0
    _undefined_to_none(report)
    return report


_PIPELINE = ("rescale_checkpoint", "measure_source", "dry_run_checkpoint", "fresh_units",
             "describe_method")


def __getattr__(name: str):
    """The SOURCE-level entry points live in pipeline.py; importable from here as before."""
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
