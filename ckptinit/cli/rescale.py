"""`ckptinit rescale SOURCE -o FILE.safetensors`: initialise or rescale, write a checkpoint."""

from __future__ import annotations

import typer

from ..options import CalibrationOptions, RescaleOptions
from .errors import cli_errors
from .options import (
    AllowChangeOpt,
    ArchOpt,
    BatchOpt,
    BetaOpt,
    BetweenOpt,
    ConfigOpt,
    CropPctOpt,
    DampingOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    FunctionTolOpt,
    GradBatchesOpt,
    HoldoutOpt,
    ImageColumnOpt,
    ImagesOpt,
    InputSizeOpt,
    InterpolationOpt,
    ItersOpt,
    JsonOpt,
    KeyMapOpt,
    MeanOpt,
    ModelArgOpt,
    NumClassesOpt,
    OutputOpt,
    PatchBudgetOpt,
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
    TolOpt,
    TrustPickleOpt,
    UseEmaOpt,
    WeightsOpt,
    WithinOpt,
    WorkersOpt,
    stage_options,
)
from .outputs import write_outputs
from .ui import Ui

_R, _C = RescaleOptions, CalibrationOptions  # defaults live in the option dataclasses


def rescale(
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
    within: WithinOpt = None,
    between: BetweenOpt = _R.between,
    weights: WeightsOpt = None,
    beta: BetaOpt = _R.beta,
    patch_budget: PatchBudgetOpt = _R.patch_budget,
    grad_batches: GradBatchesOpt = _R.grad_batches,
    damping: DampingOpt = _R.damping,
    tol: TolOpt = _R.tol,
    iters: ItersOpt = _R.iters,
    allow_function_change: AllowChangeOpt = _R.allow_function_change,
    function_tol: FunctionTolOpt = _R.function_tol,
    device: DeviceOpt = _R.device,
    batch_size: BatchOpt = _R.batch_size,
    output: OutputOpt,
    report: ReportOpt = None,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Initialise or rescale a model from calibration images; write a safetensors checkpoint.

    A bare architecture gets fresh Gaussian weights, the within-layer and the between-layer
    step; weights from a checkpoint get the between-layer step only (plus the within-layer
    step for units the checkpoint did not provide).
    """
    with cli_errors():
        ui = Ui(quiet)
        src, cal, opts = stage_options(ctx)
        from ..api import rescale_checkpoint
        from .render import print_report

        with ui:
            run = rescale_checkpoint(source, output, options=opts, source_options=src,
                                     calib_options=cal, force=force, progress=ui.progress)
        print_report(run, ui.console)
        if write_outputs(run, report, plot, as_json) is not None:  # None: JSON on stdout
            typer.echo(str(output))
