"""Typer CLI: parse, build one options object per stage, call the library, render.

Heavy imports (torch, timm, rich rendering) happen inside the commands so that --help is
instant. Results go to stdout, progress, tables and warnings to stderr, and every expected
failure (a CkptInitError) becomes one `Error: ...` line and an exit code, in `_errors`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..errors import CkptInitError, UsageError
from ..options import WEIGHT_DRAWS, CalibrationOptions, RescaleOptions, SourceOptions

app = typer.Typer(
    name="ckptinit",
    help="Data-dependent initialisation (Krähenbühl et al., ICLR 2016) for timm models and "
    "checkpoints: normalise every layer and equalise every layer's change rate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL = "Model"
DATA = "Calibration data"
METHOD = "Method"
OUTPUT = "Output"

_R, _C = RescaleOptions, CalibrationOptions  # defaults live in the option dataclasses

# --------------------------------------------------------------------------- model options
SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", show_default=False,
    help="A timm architecture (fresh weights), a checkpoint file (.safetensors, .pth, .pt, "
    ".bin), hf-hub:org/repo[@revision] or local-dir:PATH.")]
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", metavar="NAME", show_default=False, rich_help_panel=MODEL,
    help="timm architecture of a checkpoint file (default: config.json beside the file, "
    "ckptinit metadata, or the checkpoint's own 'arch' entry).")]
NumClassesOpt = Annotated[int | None, typer.Option(
    "--num-classes", metavar="N", min=0, show_default=False, rich_help_panel=MODEL,
    help="Classifier size (0: headless; a new size gets a fresh head).")]
ModelArgOpt = Annotated[list[str] | None, typer.Option(
    "--model-arg", metavar="KEY=VALUE", show_default=False, rich_help_panel=MODEL,
    help="Passed to timm.create_model; VALUE is a Python literal or a string (repeatable).")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", rich_help_panel=MODEL,
    help="Load pickles that need more than tensors (this runs code from the file: only for "
    "files you trust).")]
UseEmaOpt = Annotated[bool, typer.Option(
    "--use-ema", rich_help_panel=MODEL, help="Prefer the EMA weights of a training checkpoint.")]
StripPrefixOpt = Annotated[list[str] | None, typer.Option(
    "--strip-prefix", metavar="PREFIX", show_default=False, rich_help_panel=MODEL,
    help="Remove this key prefix, e.g. 'module.encoder_q.' (repeatable; common ones are "
    "found on their own).")]
KeyMapOpt = Annotated[list[str] | None, typer.Option(
    "--key-map", metavar="OLD=NEW", show_default=False, rich_help_panel=MODEL,
    help="Rename keys starting with OLD to start with NEW (repeatable; an empty OLD adds a "
    "prefix).")]

# --------------------------------------------------------------------------- data options
DataOpt = Annotated[str, typer.Option(
    "--data", metavar="SAMPLES|FOLDER|DATASET", rich_help_panel=DATA,
    help="'samples' (photos shipped with ckptinit, offline), an image folder or dataset "
    "files on disk, or a Hugging Face dataset id (streamed).")]
ImagesOpt = Annotated[int, typer.Option(
    "--images", metavar="N", min=1, rich_help_panel=DATA, help="Calibration images.")]
HoldoutOpt = Annotated[int, typer.Option(
    "--holdout", metavar="N", min=0, rich_help_panel=DATA,
    help="Extra images never used for fitting, for the function check.")]
SplitOpt = Annotated[str | None, typer.Option(
    "--split", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Dataset split (default: train, else the first one).")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Dataset configuration (subset) name.")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", metavar="REV", show_default=False, rich_help_panel=DATA,
    help="Dataset revision (branch, tag or commit).")]
ImageColumnOpt = Annotated[str | None, typer.Option(
    "--image-column", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Column holding the images (default: found from the dataset's features).")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", metavar="TOKEN", envvar="HF_TOKEN", show_envvar=True, show_default=False,
    rich_help_panel=DATA,
    help="Hugging Face token for gated or private datasets.")]
ShuffleBufferOpt = Annotated[int, typer.Option(
    "--shuffle-buffer", metavar="N", min=1, rich_help_panel=DATA,
    help="Shuffle buffer of streamed datasets.")]
InputSizeOpt = Annotated[int | None, typer.Option(
    "--input-size", metavar="PIXELS", min=1, show_default=False, rich_help_panel=DATA,
    help="Square input size (default: the model's data config).")]
MeanOpt = Annotated[tuple[float, float, float] | None, typer.Option(
    "--mean", metavar="R G B", show_default=False, rich_help_panel=DATA,
    help="Normalisation mean (default: the model's data config).")]
StdOpt = Annotated[tuple[float, float, float] | None, typer.Option(
    "--std", metavar="R G B", show_default=False, rich_help_panel=DATA,
    help="Normalisation std (default: the model's data config).")]
CropPctOpt = Annotated[float | None, typer.Option(
    "--crop-pct", metavar="FRACTION", show_default=False, rich_help_panel=DATA,
    help="Center-crop fraction in (0, 1] (default: the model's data config).")]
InterpolationOpt = Annotated[str | None, typer.Option(
    "--interpolation", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Resize filter: nearest, bilinear, bicubic, box, hamming, lanczos (default: the "
    "model's data config).")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", metavar="N", min=0, show_default=False, rich_help_panel=DATA,
    help="Image decoding threads (default: up to 8).")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", metavar="INT", rich_help_panel=DATA,
    help="Seed for image order, crops, weight draws and gradient draws.")]

# --------------------------------------------------------------------------- method options
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda", rich_help_panel=METHOD,
    help="Where to compute (auto: cuda when available).")]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", metavar="N", min=1, rich_help_panel=METHOD,
    help="Images per forward pass.")]
GradBatchesOpt = Annotated[int, typer.Option(
    "--grad-batches", metavar="N", min=1, rich_help_panel=METHOD,
    help="Batches (each with its own random loss direction) per change-rate estimate.")]
AllowChangeOpt = Annotated[bool, typer.Option(
    "--allow-function-change", rich_help_panel=METHOD,
    help="Let units move whose rescaling cannot be compensated (they are pinned otherwise).")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel=OUTPUT, help="Nothing on stderr but errors.")]
PlotOpt = Annotated[Path | None, typer.Option(
    "--plot", metavar="FILE.png", show_default=False, rich_help_panel=OUTPUT,
    help="Plot the per-unit change rates (log scale).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptinit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """ckptinit command-line interface."""


# --------------------------------------------------------------------------- parsing helpers


def parse_model_args(items: list[str] | None) -> dict:
    """KEY=VALUE pairs; values are Python literals when they parse as one, else strings."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg '{item}' is not KEY=VALUE (e.g. drop_rate=0.1).")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def parse_key_map(items: list[str] | None) -> dict[str, str]:
    """OLD=NEW prefix renames; OLD may be empty (add a prefix), NEW may be empty (strip)."""
    out: dict[str, str] = {}
    for item in items or []:
        old, sep, new = item.partition("=")
        if not sep or not (old or new):
            raise UsageError(f"--key-map '{item}' is not OLD=NEW (e.g. trunk.=, or =backbone.).")
        out[old] = new
    return out


def _source_options(arch, num_classes, model_arg, trust_pickle, use_ema, strip_prefix,
                    key_map) -> SourceOptions:
    return SourceOptions(arch=arch, num_classes=num_classes,
                         model_args=parse_model_args(model_arg), trust_pickle=trust_pickle,
                         use_ema=use_ema, strip_prefix=list(strip_prefix or []),
                         key_map=parse_key_map(key_map))


def _check_side_file(path: Path | None, what: str, suffixes: tuple[str, ...]) -> None:
    """Refuse before any work a report or plot path that cannot be written."""
    if path is None or str(path) == "-":
        return
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{what} '{path}' must end in {' or '.join(suffixes)}.")
    if path.is_dir():
        raise UsageError(f"{what} '{path}' is a folder; give a file name.")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"Cannot write {what} '{path}': folder '{parent}' does not exist.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"Cannot write {what} '{path}': permission denied.")


def _check_device(device: str) -> None:
    base, _, index = device.partition(":")
    if base not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()) or (
            index and base != "cuda"):
        raise UsageError(f"Unknown --device '{device}'; use auto, cpu or cuda (or cuda:N).")


# --------------------------------------------------------------------------- errors and UI


def _fail(e: BaseException) -> None:
    """One line on stderr, a non-zero exit; the traceback only with CKPTINIT_DEBUG=1."""
    if os.environ.get("CKPTINIT_DEBUG"):
        raise e
    if isinstance(e, CkptInitError):
        msg, code = str(e).strip().replace("\n", " "), e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        msg, code = "interrupted", 130
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"unexpected {type(e).__name__}: {first} (set CKPTINIT_DEBUG=1 for the traceback)"
        code = 1
    typer.echo(f"Error: {msg}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The one place where failures become `Error: ...` lines and exit codes."""
    import click

    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


class _Ui:
    """stderr console, progress bars and logging for one command."""

    def __init__(self, quiet: bool):
        from rich.console import Console
        from rich.logging import RichHandler

        # huggingface_hub and datasets print their warnings (e.g. every network retry) through
        # handlers of their own; keep them to errors, set before they are first imported
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            self.console.width = 160  # logs and CI: do not squeeze the table into 80 columns
        level = logging.DEBUG if os.environ.get("CKPTINIT_DEBUG") else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", force=True,
                            handlers=[RichHandler(console=self.console, show_path=False,
                                                  show_time=False)])
        logging.captureWarnings(True)  # library warnings through the same (quiet-able) console
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=self.console, transient=True,
                                  disable=self.quiet or not self.console.is_terminal)
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def progress(self, stage: str, done: int, total: int | None) -> None:
        """Library progress callback: one line for the current stage (a bar when it has a
        total); a new stage replaces the previous one."""
        if stage not in self._tasks:
            for t in self._tasks.values():
                self._progress.remove_task(t)
            self._tasks = {stage: self._progress.add_task(stage, total=total)}
        self._progress.update(self._tasks[stage], completed=done, total=total)


def _write_outputs(run, json_path: Path | None, plot_path: Path | None) -> list[str]:
    """The report as JSON ('-': stdout) and the plot; returns the paths written."""
    written = []
    if json_path is not None:
        if str(json_path) == "-":
            typer.echo(json.dumps(run.to_dict(), indent=2, default=str))
        else:
            run.write_json(json_path)
            written.append(str(json_path))
    if plot_path is not None:
        from ..report import plot_rates

        plot_rates(run, plot_path)
        written.append(str(plot_path))
    return written


# --------------------------------------------------------------------------- commands


@app.command()
def rescale(
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
    within: Annotated[bool | None, typer.Option(
        "--within/--no-within", show_default=False, rich_help_panel=METHOD,
        help="Within-layer step: draw (see --weights) and normalise every unit (default: only "
        "units without loaded weights).")] = None,
    between: Annotated[bool, typer.Option(
        "--between/--no-between", rich_help_panel=METHOD,
        help="Between-layer step: equalise the units' change rates.")] = _R.between,
    weights: Annotated[str | None, typer.Option(
        "--weights", metavar="DRAW", show_default=False,
        rich_help_panel=METHOD,
        help=f"Weight draw for the units of the within-layer step: {', '.join(WEIGHT_DRAWS)} "
        "(default: gaussian for fresh units, keep for loaded ones).")] = None,
    beta: Annotated[float, typer.Option(
        "--beta", metavar="FLOAT", rich_help_panel=METHOD,
        help="Target mean of every unit's outputs (units with a bias).")] = _R.beta,
    patch_budget: Annotated[int, typer.Option(
        "--patch-budget", metavar="N", min=1, rich_help_panel=METHOD,
        help="Input patches per unit for the pca and kmeans draws.")] = _R.patch_budget,
    grad_batches: GradBatchesOpt = _R.grad_batches,
    damping: Annotated[float, typer.Option(
        "--damping", metavar="ALPHA", rich_help_panel=METHOD,
        help="Step size alpha in (0, 1] of the between-layer update r = (C/Cbar)^(alpha/2).")]
    = _R.damping,
    tol: Annotated[float, typer.Option(
        "--tol", metavar="FRACTION", rich_help_panel=METHOD,
        help="Stop when every change rate is within this fraction of the mean.")] = _R.tol,
    iters: Annotated[int, typer.Option(
        "--iters", metavar="N", min=0, rich_help_panel=METHOD,
        help="Most between-layer iterations.")] = _R.iters,
    allow_function_change: AllowChangeOpt = _R.allow_function_change,
    function_tol: Annotated[float, typer.Option(
        "--function-tol", metavar="FRACTION", min=0.0, rich_help_panel=METHOD,
        help="Largest relative change of the outputs on held-out images allowed for loaded "
        "weights; above it nothing is written.")] = _R.function_tol,
    device: DeviceOpt = _R.device,
    batch_size: BatchOpt = _R.batch_size,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="FILE.safetensors", show_default=False,
        rich_help_panel=OUTPUT, help="Output checkpoint.")],
    report: Annotated[Path | None, typer.Option(
        "--report", metavar="FILE.json", show_default=False, rich_help_panel=OUTPUT,
        help="Write the per-unit report as JSON ('-': stdout).")] = None,
    plot: PlotOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", rich_help_panel=OUTPUT, help="Overwrite an existing output.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Initialise or rescale a model from calibration images; write a safetensors checkpoint.

    A bare architecture gets fresh Gaussian weights, the within-layer and the between-layer
    step; weights from a checkpoint get the between-layer step only (plus the within-layer
    step for units the checkpoint did not provide).
    """
    with _errors():
        if weights is not None and weights not in WEIGHT_DRAWS:
            raise UsageError(f"Unknown --weights '{weights}'; use one of "
                             f"{', '.join(WEIGHT_DRAWS)}.")
        if weights is not None and within is False:
            raise UsageError("--weights draws weights for the within-layer step; it cannot be "
                             "combined with --no-within.")
        if not 0 < damping <= 1:
            raise UsageError(f"--damping must be in (0, 1], got {damping:g}.")
        if not tol > 0:
            raise UsageError(f"--tol must be positive, got {tol:g}.")
        _check_device(device)
        _check_side_file(report, "--report", (".json",))
        _check_side_file(plot, "--plot", (".png", ".svg", ".pdf"))
        opts = RescaleOptions(
            within=within, between=between, weights=weights, beta=beta, batch_size=batch_size,
            seed=seed, device=device, patch_budget=patch_budget, grad_batches=grad_batches,
            damping=damping, tol=tol, iters=iters,
            allow_function_change=allow_function_change, function_tol=function_tol)
        src = _source_options(arch, num_classes, model_arg, trust_pickle, use_ema, strip_prefix,
                              key_map)
        cal = CalibrationOptions(
            data=data, images=images, holdout=holdout, seed=seed, split=split, config=config,
            revision=revision, image_column=image_column, token=token,
            shuffle_buffer=shuffle_buffer, input_size=input_size, mean=mean, std=std,
            crop_pct=crop_pct, interpolation=interpolation, workers=workers)

        ui = _Ui(quiet)
        from ..api import rescale_checkpoint
        from .render import print_report

        with ui:
            run = rescale_checkpoint(source, output, options=opts, source_options=src,
                                     calib_options=cal, force=force, progress=ui.progress)
        print_report(run, ui.console)
        _write_outputs(run, report, plot)
        if str(report) != "-":  # with the report on stdout, stdout stays valid JSON
            typer.echo(str(output))


@app.command()
def measure(
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
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="FILE.json", show_default=False, rich_help_panel=OUTPUT,
        help="Write the per-unit measurements as JSON ('-': stdout).")] = None,
    plot: PlotOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure every unit's output statistics and change rate; change and write no model.

    Prints the table on stderr; writes only the files asked for with --json and --plot.
    """
    with _errors():
        _check_device(device)
        _check_side_file(json_path, "--json", (".json",))
        _check_side_file(plot, "--plot", (".png", ".svg", ".pdf"))
        opts = RescaleOptions(batch_size=batch_size, seed=seed, device=device,
                              grad_batches=grad_batches,
                              allow_function_change=allow_function_change)
        src = _source_options(arch, num_classes, model_arg, trust_pickle, use_ema, strip_prefix,
                              key_map)
        cal = CalibrationOptions(
            data=data, images=images, holdout=holdout, seed=seed, split=split, config=config,
            revision=revision, image_column=image_column, token=token,
            shuffle_buffer=shuffle_buffer, input_size=input_size, mean=mean, std=std,
            crop_pct=crop_pct, interpolation=interpolation, workers=workers)

        ui = _Ui(quiet)
        from ..api import measure_source
        from .render import print_report

        with ui:
            run = measure_source(source, options=opts, source_options=src, calib_options=cal,
                                 progress=ui.progress)
        print_report(run, ui.console)
        for path in _write_outputs(run, json_path, plot):
            typer.echo(path)


@app.command()
def info(
    file: Annotated[Path, typer.Argument(
        metavar="FILE", show_default=False,
        help="A checkpoint file (.safetensors, or a pickle: .pth, .pt, .bin).")],
    trust_pickle: TrustPickleOpt = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the information as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what a checkpoint holds: format, tensors, architecture and ckptinit provenance.

    Reads only the header of a safetensors file; builds no model.
    """
    with _errors():
        _Ui(quiet)  # logging and warnings on stderr
        from ..sources import read_info
        from .render import info_dict, print_info

        result = read_info(file, trust_pickle=trust_pickle)
        if as_json:
            typer.echo(json.dumps(info_dict(result), indent=2, default=str))
        else:
            from rich.console import Console

            print_info(result, Console(soft_wrap=True))


def main() -> None:
    app(prog_name="ckptinit")

