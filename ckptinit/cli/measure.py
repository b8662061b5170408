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
    ModelArgOpt,
    NumClassesOpt,
    PlotOpt,
    QuietOpt,
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
    batch_size: BatchOpt = _R.batch_size,
    json_path: JsonOpt = None,
    plot: PlotOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure every unit's output statistics and change rate; change and write no model.

    Prints the table on stderr; writes only the files asked for with --json and --plot.
    """
    with cli_errors():
        src, cal, opts = stage_options(ctx.params)
        ui = Ui(quiet)
        from ..api import measure_source
        from .render import print_report

        with ui:
            run = measure_source(source, options=opts, source_options=src, calib_options=cal,
                                 progress=ui.progress)
        print_report(run, ui.console)
        for path in write_outputs(run, json_path, plot):
            typer.echo(path)
