"""`ckptinit measure SOURCE`: every unit's statistics and change rate; no model is written."""

from __future__ import annotations

import typer

from ..options import CalibrationOptions, RescaleOptions
from .errors import cli_errors
from .options import (
    AllowChangeOpt,
    ArchOpt,
    BatchOpt,
    ConfigOpt,
    CropPctOpt,
    DataOpt,
    DeviceOpt,
    GradBatchesOpt,
    HoldoutOpt,
    ImageColumnOpt,
    ImagesOpt,
    InputSizeOpt,
    InterpolationOpt,
    JsonOpt,
    KeyMapOpt,
    MeanOpt,
    MemoryFormatOpt,
    ModelArgOpt,
    NumClassesOpt,
    PlotOpt,
    QuietOpt,
    ReportOpt,
    RevisionOpt,
    SeedOpt,
    ShuffleBufferOpt,
    SourceArg,
    SplitOpt,
    StdOpt,
    StripPrefixOpt,
    TokenOpt,
    TrustPickleOpt,
    UseEmaOpt,
    WorkersOpt,
    stage_options,
)
from .outputs import write_outputs
from .ui import Ui

_R, _C = RescaleOptions, CalibrationOptions  # defaults live in the option dataclasses


def measure(
    ctx: typer.Context,
    source: SourceArg,
    *,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    model_arg: ModelArgOpt = None,
    trust_pickle: TrustPickleOpt = False,
    use_ema: UseEmaOpt = False,
    strip_prefix: StripPrefixOpt = None,
    key_map: KeyMapOpt = None,
    data: DataOpt = _C.data,
    images: ImagesOpt = _C.images,
    holdout: HoldoutOpt = _C.holdout,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    revision: RevisionOpt = None,
    image_column: ImageColumnOpt = None,
    token: TokenOpt = None,
    shuffle_buffer: ShuffleBufferOpt = _C.shuffle_buffer,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    workers: WorkersOpt = None,
    seed: SeedOpt = _R.seed,
    grad_batches: GradBatchesOpt = _R.grad_batches,
    allow_function_change: AllowChangeOpt = _R.allow_function_change,
    device: DeviceOpt = _R.device,
    memory_format: MemoryFormatOpt = _R.memory_format,
    batch_size: BatchOpt = _R.batch_size,
    report: ReportOpt = None,
    plot: PlotOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure every unit's output statistics and change rate; change and write no model.

    Prints the table on stderr; writes only the files asked for with --report and --plot
    (their paths go to stdout), or, with --json, the measurements on stdout.
    """
    with cli_errors():
        ui = Ui(quiet)
        src, cal, opts = stage_options(ctx)
        from ..pipeline import measure_source
        from .render import print_report

        with ui:
            run = measure_source(source, options=opts, source_options=src, calib_options=cal,
                                 progress=ui.progress)
        print_report(run, ui.console)
        written = write_outputs(run, report, plot, as_json)
        for path in written or []:
            typer.echo(path)
