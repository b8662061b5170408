"""SOURCE to output file: the whole pipeline around `api.rescale` and `api.measure`
(load the model, read the calibration images, run the method, write), also under torchrun."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import __version__
from .api import SAMPLE_IMAGES, measure, rescale
from .device import peak_rss_bytes, resolve_device
from .method.units import is_unit
from .options import CalibrationOptions, PublishOptions, RescaleOptions, SourceOptions
from .report import RunReport

log = logging.getLogger(__name__)


def _load_seeded(source: str, options: SourceOptions | None, seed: int):
    """load_source with timm's fresh weights drawn from `seed`: timm draws them from the
    global CPU generator, which is seeded for the load and then given back as it was."""
    from .sources import load_source

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return load_source(source, options or SourceOptions())


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
            loaded.model, calib_options, progress=lambda d, t: step("reading images", d, t),
            share=_share(options, calib_options, ranks, loaded.pretrained),
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
                            f"{ranks.world}th batch, "
                            + ("decoding only their images" if calib.common is not None else
                               "each decoding every image (no --holdout)")
                            + "; the resources are rank 0's")
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


def _share(options: RescaleOptions, calib_options: CalibrationOptions, ranks, loaded: bool):
    """The calibration images this rank decodes under torchrun: those of the batches it
    runs (its every N-th batch, the batches of its gradient draws), the first ones and the
    holdout. Without a holdout the function check runs on every calibration batch on
    every rank, so every rank reads every image (None, as alone)."""
    from .data.read import Share
    from .distributed import draw_batches

    size = options.batch_size
    if ranks.world == 1 or size < 1 or calib_options.images < 1:
        return None  # alone, or options that the method refuses with its own message
    if calib_options.holdout == 0:
        log.info("Every rank reads every calibration image: without --holdout the checks "
                 "run on all of them")
        return None
    count = -(-calib_options.images // size)
    batches = set(range(ranks.rank, count, ranks.world))
    if options.between:  # the batches of this rank's gradient draws
        batches |= set(draw_batches(options.draws(loaded), count).values())
    return Share(batch_size=size, batches=frozenset(batches), prefix=SAMPLE_IMAGES,
                 images=calib_options.images, window=ranks.world * size)


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


def dry_run_checkpoint(
    source: str,
    output: str | Path,
    *,
    options: RescaleOptions | None = None,
    source_options: SourceOptions | None = None,
    calib_options: CalibrationOptions | None = None,
    force: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
    writes: Iterable[str] = (),
):
    """What `rescale_checkpoint` would do (method/dry_run.py): the same checks of options,
    device, data and SOURCE, the model built, no image decoded, nothing written. A refusal
    of `output` is reported, not raised; `writes` names the side files it would write."""
    from .data.calibration import check_data
    from .data.readers import open_source
    from .data.transforms import resolve_data_config
    from .errors import CkptInitError
    from .method.dry_run import dry_run
    from .output.checkpoint import check_output
    from .sources.load import input_files

    options, cal = (options or RescaleOptions()).check(), calib_options or CalibrationOptions()
    step = progress or (lambda stage, done, total: None)
    check_data(cal)
    resolve_device(options.device)  # the checks of a run; the small passes run on the CPU
    try:
        check_output(output, force, inputs=input_files(source))
        refusal = None
    except CkptInitError as e:
        refusal = str(e)
    step("loading model", 0, None)
    loaded = _load_seeded(source, source_options, options.seed)
    input_size = tuple(resolve_data_config(loaded.model, cal)["input_size"])
    hub = cal.data != "samples" and not Path(cal.data).expanduser().exists()
    found = None if hub else open_source(cal, cal.images + cal.holdout)  # lists, decodes none
    step("planning", 0, None)
    plan = dry_run(loaded.model, input_size, options, fresh=fresh_units(loaded),
                   images=cal.images, holdout=cal.holdout)
    plan.source = loaded.to_dict()
    plan.data.update(data=cal.data, kind=found.kind if found else "hub",
                     available=found.available if found else None)
    plan.would_write, plan.would_refuse = [str(output), *map(str, writes)], refusal
    plan.notes[:0] = list(loaded.notes)
    return plan
