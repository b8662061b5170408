"""The library entry points: `rescale` and `measure` on any nn.Module and a tensor of images."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .data.batches import BatchesLike, as_batches, first_images
from .device import (
    on_device,
    peak_rss_bytes,
    precision,
    resolve_device,  # noqa: F401  (public here too: ckptinit.api.resolve_device)
)
from .errors import UsageError
from .method.units import is_unit, scan_units
from .method.within import normalize_within_
from .options import (
    CalibrationOptions,
    PublishOptions,
    RescaleOptions,
    SourceOptions,
)
from .report import RunReport, UnitRecord

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _load_seeded(source: str, options: SourceOptions | None, seed: int):
    """load_source with timm's fresh weights drawn from `seed`: timm draws them from the
    global CPU generator, which is seeded for the load and then given back as it was."""
    from .sources import load_source

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return load_source(source, options or SourceOptions())


def _batches(images: BatchesLike, batch_size: int, device: torch.device):
    """The calibration images as batches on `device`, streamed (never all on the device)."""
    if isinstance(images, torch.Tensor) and (images.dim() != 4 or images.shape[0] == 0):
        raise UsageError(f"Calibration images must be a non-empty (N, C, H, W) tensor, got "
                         f"{tuple(images.shape)}.")
    batches = as_batches(images, batch_size, device)
    if not len(batches):
        raise UsageError("Calibration images must hold at least one batch; got none.")
    return batches


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
    """
    options = (options or RescaleOptions()).check()
    with on_device(model, options.device) as run:
        report = _rescale(model, images, options, run.device, fresh, holdout, progress)
        report.resources = run.resources()
    return model, report


def _rescale(model, images, options, device, fresh, holdout, progress) -> RunReport:
    note = progress or (lambda msg: None)
    t0 = time.perf_counter()
    batches = _batches(images, options.batch_size, device)
    sample = first_images(batches, 4)
    scan = scan_units(model, sample[:2])
    fresh_set = {u.name for u in scan.units} if fresh is None else set(fresh)
    report, records = _new_report("rescale", options, scan)
    report.timings["scan"] = time.perf_counter() - t0

    if options.within is None and options.weights is None:
        targets = {u.name for u in scan.units if u.name in fresh_set}
    else:  # --within, or an explicit --weights draw: every unit
        targets = {u.name for u in scan.units} if options.within is not False else set()
    draws = {
        n: options.weights or ("gaussian" if n in fresh_set else "keep") for n in targets
    }
    for name in fresh_set & set(records):
        records[name].note = "fresh"
    if options.residual_init == "data" and fresh_set >= {u.name for u in scan.units}:
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
    if options.between:
        holdout_batches = _batches(holdout, options.batch_size, device) if holdout is not None \
            and len(holdout) else batches
        with precision(device, tf32=False):  # its function check compares outputs to 1e-4
            _between(model, scan, batches, holdout_batches, report, options, fresh_set, note,
                     sample)
    else:
        report.notes.append("between-layer step skipped")
    if scan.never_called:
        report.notes.append(f"{len(scan.never_called)} unit(s) never called in the forward "
                            f"pass, left as they are: {', '.join(scan.never_called[:5])}")
    report.timings["total"] = time.perf_counter() - t0
    _undefined_to_none(report)
    return report


def rescale_checkpoint(
    source: str,
    output: str | Path,
    *,
    options: RescaleOptions | None = None,
    source_options: SourceOptions | None = None,
    calib_options: CalibrationOptions | None = None,
    force: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
    publish: PublishOptions | None = None,
) -> RunReport:
    """SOURCE -> calibration images -> `rescale` -> a safetensors file with provenance, or
    (`output` without .safetensors) a Hub-ready folder described by `publish`.

    Under torchrun (WORLD_SIZE > 1) every rank takes its share of the batches and rank 0
    alone writes (ckptinit.distributed); the result is that of one process."""
    from . import distributed

    options = options or RescaleOptions()
    ranks = distributed.from_env(options.device)
    try:
        return _rescale_checkpoint(source, output, options, source_options,
                                   calib_options or CalibrationOptions(), force, progress,
                                   publish or PublishOptions(), ranks)
    finally:
        distributed.shutdown()


def _rescale_checkpoint(source, output, options, source_options, calib_options, force,
                        progress, publish, ranks) -> RunReport:
    from .data.calibration import check_data, load_calibration
    from .distributed import together
    from .output.checkpoint import check_output, save_checkpoint
    from .output.folder import is_folder_output, write_folder
    from .output.metadata import build_header
    from .sources.load import input_files

    step = progress or (lambda stage, done, total: None)
    with together():  # a failure on any rank stops them all, with one message
        if ranks.main:  # the writer
            check_output(output, force, inputs=input_files(source))  # refuse before any work
        check_data(calib_options)
        device = resolve_device(options.device)
    with together():
        step("loading model", 0, None)
        t0 = time.perf_counter()
        loaded = _load_seeded(source, source_options, options.seed)
        loaded.model.to(device)
        t1 = time.perf_counter()
        calib = load_calibration(
            loaded.model, calib_options, progress=lambda d, t: step("reading images", d, t)
        )
        t2 = time.perf_counter()
    with calib:
        _same_images(calib, ranks)
        model, report = rescale(
            loaded.model, calib.batches(options.batch_size), options,
            fresh=fresh_units(loaded), holdout=calib.holdout,
            progress=lambda msg: step(msg, 0, None),
        )
        report.resources.update(spool_bytes=calib.spool.nbytes,
                                spool_dtype=calib.spool.dtype.name)
    report.source = loaded.to_dict()
    report.data = calib.info.to_dict()
    report.notes[:0] = list(calib.info.notes) + list(loaded.notes)
    if ranks.world > 1:
        report.notes.append(f"{ranks.world} processes (torchrun), each on every "
                            f"{ranks.world}th batch; the resources are rank 0's")
    report.method, report.command_line = describe_method(report), publish.command_line
    if not ranks.main:  # rank 0 writes; every rank has the same weights and report
        return report
    step("writing checkpoint", 0, None)
    metadata = build_header(version=__version__, method=report.method,
                            options=report.options, seed=options.seed, loaded=loaded,
                            data=calib.info)
    t3 = time.perf_counter()
    if is_folder_output(output):
        write_folder(output, model=model, metadata=metadata, report=report,
                     originals=loaded.original_tensors, license=publish.license,
                     repo_id=publish.repo_id, force=force)
    else:
        save_checkpoint(model, output, metadata, originals=loaded.original_tensors,
                        force=force)
    report.timings.update(load=t1 - t0, data=t2 - t1, write=time.perf_counter() - t3,
                          pipeline=time.perf_counter() - t0)
    report.resources["peak_rss_bytes"] = peak_rss_bytes()
    return report


def _same_images(calib, ranks) -> None:
    """Under torchrun every rank must have read the same images (one --data on every node)."""
    from .distributed import same_as_main, together
    from .errors import DataError

    if ranks.world == 1:
        return
    same = same_as_main(calib.fingerprint())
    with together():
        if not same:
            raise DataError(f"Rank {ranks.rank} read other calibration images than rank 0; "
                            "every process must see the same --data (the same files, and "
                            "the same library versions to decode them).")


def fresh_units(loaded) -> set[str] | None:
    """Units whose weights did not come from the source (None: all, a bare architecture)."""
    if not loaded.pretrained:
        return None
    return {name for name, m in loaded.model.named_modules()
            if is_unit(m) and f"{name}.weight" not in loaded.loaded_keys}


def describe_method(report: RunReport) -> str:
    """One line for the metadata: which steps ran, with their main parameters."""
    o = report.options
    parts = []
    draws = sorted({u.draw for u in report.units if u.draw})
    within = [u for u in report.units if u.action != "none"]
    if within:
        parts.append(f"within(units={len(within)},draw={'/'.join(draws) or 'keep'},"
                     f"beta={o['beta']})")
    if report.between_iterations:
        parts.append(f"between(iters={report.between_iterations},damping={o['damping']},"
                     f"tol={o['tol']})")
    return "+".join(parts) or "none"


def _share_branches(model, sample, report) -> None:
    from .method.branches import share_residual_branches_, zero_started_multipliers

    names = zero_started_multipliers(model, sample[:2])
    if names:
        share = share_residual_branches_(model, names)
        report.notes.append(
            f"residual branches: {len(names)} started at zero; their multipliers set to "
            f"{share:.3g} = 1/sqrt({len(names)}) so that every unit takes part "
            "(--residual-init timm keeps them)")


def _between(model, scan, batches, holdout, report, options, fresh, note, sample) -> None:
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
        optimizer=options.optimizer, progress=note,
    )
    report.between_iterations = result.iterations
    report.converged = result.converged
    report.function_check = result.check
    counts = {s: sum(u.between_status == s for u in report.units)
              for s in ("pinned", "excluded", "tied", "limited")}
    spread_b, spread_a = (_g(report.rate_spread(w)) for w in ("before", "after"))
    rate = "lr/RMS(W) (Adam)" if options.optimizer == "adam" else "change rate"
    report.notes.append(
        f"between-layer: {result.iterations} iteration(s), "
        f"{'converged' if result.converged else 'NOT converged'} within {options.tol:.0%}; "
        f"{rate} spread (max/min) {spread_b} -> {spread_a}; "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + (f"; {result.batchnorms_reestimated} BatchNorm layers re-estimated"
           if result.batchnorms_reestimated else "")
    )
    report.timings["between"] = time.perf_counter() - t


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
    with on_device(model, options.device) as run:
        report = _measure(model, images, options, run.device, fresh)
        report.resources = run.resources()
    return report


def _measure(model, images, options, device, fresh) -> RunReport:
    from .method.moves import plan_moves
    from .method.rates import estimate_rates
    from .method.units import calibration_mode
    from .method.within import measure_outputs

    t0 = time.perf_counter()
    batches = _batches(images, options.batch_size, device)
    sample = first_images(batches, 4)
    scan = scan_units(model, sample[:2])
    report, records = _new_report("measure", options, scan)
    with calibration_mode(model):
        moments = measure_outputs(model, scan.units, batches)
    for u in scan.units:
        m = moments[u.name]
        records[u.name].mean_before = float(m.mean.mean())
        records[u.name].std_before = float(m.std.mean())
    fresh_set = {u.name for u in scan.units} if fresh is None else set(fresh)
    plan = plan_moves(model, scan.units, sample, fresh_set, options.allow_function_change)
    rates = estimate_rates(model, scan.units, batches, options.grad_batches, options.seed,
                           plan.slices)
    for u in scan.units:
        rec = records[u.name]
        rec.rate_before = rates.rate(u.name)
        rec.compensation = plan.compensation.get(u.name, "-")
        key = (u.name, plan.slices[u.name] - 1)
        if key in plan.pinned:
            rec.between_status, rec.between_reason = "pinned", plan.pinned[key]
        elif not rec.rate_before > 0:
            rec.between_status, rec.between_reason = "excluded", "zero gradient"
        else:
            rec.between_status = "ok"
        if plan.slices[u.name] > 1:
            rec.slices = [{"slice": "qkv"[s] if plan.slices[u.name] == 3 else "kv"[s],
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


def measure_source(
    source: str,
    *,
    options: RescaleOptions | None = None,
    source_options: SourceOptions | None = None,
    calib_options: CalibrationOptions | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> RunReport:
    """SOURCE -> calibration images -> `measure` (nothing is written). A bare architecture's
    fresh weights are drawn from `options.seed`, as in `rescale_checkpoint`."""
    from .data.calibration import check_data, load_calibration

    options = options or RescaleOptions()
    check_data(calib_options or CalibrationOptions())
    device = resolve_device(options.device)
    step = progress or (lambda stage, done, total: None)
    step("loading model", 0, None)
    loaded = _load_seeded(source, source_options, options.seed)
    loaded.model.to(device)
    calib = load_calibration(loaded.model, calib_options or CalibrationOptions(),
                             progress=lambda d, t: step("reading images", d, t))
    step("measuring", 0, None)
    with calib:
        report = measure(loaded.model, calib.batches(options.batch_size),
                         options, fresh=fresh_units(loaded))
    report.source = loaded.to_dict()
    report.data = calib.info.to_dict()
    report.notes[:0] = list(calib.info.notes) + list(loaded.notes)
    return report
