"""`ckptinit rescale SOURCE -o FILE.safetensors|FOLDER`: initialise or rescale, write a
checkpoint or a Hub-ready folder (and with --push-to, upload it)."""

from __future__ import annotations

from pathlib import Path

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
    DryRunOpt,
    ForceOpt,
    FunctionTolOpt,
    GradBatchesOpt,
    HeadStdOpt,
    HoldoutOpt,
    ImageColumnOpt,
    ImagesOpt,
    InputSizeOpt,
    InterpolationOpt,
    ItersOpt,
    JsonOpt,
    KeyMapOpt,
    LicenseOpt,
    MeanOpt,
    MemoryFormatOpt,
    ModelArgOpt,
    NumClassesOpt,
    OptimizerOpt,
    OutputOpt,
    PatchBudgetOpt,
    PlotOpt,
    PrivateOpt,
    PushToOpt,
    QuietOpt,
    ReportOpt,
    ResidualInitOpt,
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
from .push import publish_options, upload
from .ui import Ui

PIPE_WIDTH = 200  # columns of the --dry-run plan when stdout is not a terminal
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
    head_std: HeadStdOpt = _R.head_std,
    patch_budget: PatchBudgetOpt = _R.patch_budget,
    grad_batches: GradBatchesOpt = _R.grad_batches,
    damping: DampingOpt = _R.damping,
    tol: TolOpt = _R.tol,
    iters: ItersOpt = _R.iters,
    allow_function_change: AllowChangeOpt = _R.allow_function_change,
    function_tol: FunctionTolOpt = _R.function_tol,
    optimizer: OptimizerOpt = _R.optimizer,
    residual_init: ResidualInitOpt = _R.residual_init,
    device: DeviceOpt = _R.device,
    memory_format: MemoryFormatOpt = _R.memory_format,
    batch_size: BatchOpt = _R.batch_size,
    output: OutputOpt,
    report: ReportOpt = None,
    plot: PlotOpt = None,
    license: LicenseOpt = None,
    push_to: PushToOpt = None,
    private: PrivateOpt = False,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Initialise or rescale a model from calibration images; write a safetensors checkpoint
    or (-o FOLDER) a folder ready for the Hugging Face Hub.

    A bare architecture gets fresh Gaussian weights, the within-layer and the between-layer
    step; weights from a checkpoint get the between-layer step only (plus the within-layer
    step for units the checkpoint did not provide).
    """
    with cli_errors():
        from ..distributed import env_ranks

        main = env_ranks().main  # under torchrun only rank 0 reports and writes
        ui = Ui(quiet or not main)
        src, cal, opts = stage_options(ctx)
        if dry_run:  # the same checks, but no Hub contact for --push-to and no file written
            publish_options(ctx, output, None, license, token, force)
            return _dry_run(ui, ctx.params, source, output, src, cal, opts, as_json)
        publish = publish_options(ctx, output, push_to, license, token, force, private)
        from ..pipeline import rescale_checkpoint
        from .render import print_report

        with ui:
            run = rescale_checkpoint(source, output, options=opts, source_options=src,
                                     calib_options=cal, force=force, progress=ui.progress,
                                     publish=publish)
        if not main:
            return
        print_report(run, ui.console)
        json_out = write_outputs(run, report, plot, as_json) is None  # None: JSON on stdout
        if not json_out:
            typer.echo(str(output))
        if publish.repo_id:
            upload(ui, output, publish.repo_id, url_on_stdout=not json_out, token=token,
                   private=private, force=force)


def _dry_run(ui: Ui, params: dict, source, output, src, cal, opts, as_json: bool) -> None:
    """The plan on stdout: a table, or JSON with --json (or --report -)."""
    import json

    from rich.console import Console

    from ..pipeline import dry_run_checkpoint
    from .render_plan import print_plan

    writes = [params[k] for k in ("report", "plot") if params[k] not in (None, Path("-"))]
    if params["push_to"]:
        writes.append(f"hf-hub:{params['push_to']} (upload; the Hub is not contacted now)")
    with ui:
        plan = dry_run_checkpoint(source, output, options=opts, source_options=src,
                                  calib_options=cal, force=params["force"],
                                  progress=ui.progress, writes=writes)
    if as_json or str(params["report"]) == "-":
        typer.echo(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        console = Console()  # stdout; piped or captured, wide enough not to wrap the table
        print_plan(plan, console if console.is_terminal else Console(width=PIPE_WIDTH))
