"""Typer CLI: parse, build one options object per stage, call the library, render.

Heavy imports (torch, timm) happen inside the commands so that --help is instant.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import CkptInitError, UsageError

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

SourceArg = Annotated[str, typer.Argument(
    help="A timm architecture (fresh weights), a checkpoint file, hf-hub:org/repo or "
    "local-dir:PATH.", show_default=False)]
ModelArgOpt = Annotated[list[str] | None, typer.Option(
    "--model-arg", metavar="KEY=VALUE", help="Passed to timm.create_model (repeatable).",
    rich_help_panel=MODEL)]
NumClassesOpt = Annotated[int | None, typer.Option(
    help="Classifier size (0: headless).", rich_help_panel=MODEL)]
DataOpt = Annotated[str, typer.Option(
    help="'samples' (shipped photos), an image folder, or a Hugging Face dataset id.",
    rich_help_panel=DATA)]
ImagesOpt = Annotated[int, typer.Option(min=1, help="Calibration images.", rich_help_panel=DATA)]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per forward pass.",
                                       rich_help_panel=DATA)]
SeedOpt = Annotated[int, typer.Option(help="Seed for data order, crops and draws.",
                                      rich_help_panel=DATA)]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=METHOD)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]


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


def parse_model_args(items: list[str] | None) -> dict:
    """KEY=VALUE pairs; values are Python literals when they parse as one, else strings."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg '{item}' is not KEY=VALUE.")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


class _Ui:
    """stderr console, progress bars and logging for one command."""

    def __init__(self, quiet: bool):
        from rich.console import Console
        from rich.logging import RichHandler

        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)
        if not self.console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
            self.console.width = 160
        level = logging.DEBUG if os.environ.get("CKPTINIT_DEBUG") else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", force=True,
                            handlers=[RichHandler(console=self.console, show_path=False)])
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
                                  console=self.console, transient=True, disable=self.quiet)
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def progress(self, stage: str, done: int, total: int | None) -> None:
        """Library progress callback: one bar per stage."""
        if stage not in self._tasks:
            for t in self._tasks.values():  # a new stage means the earlier ones are done
                task = self._progress.tasks[t]
                self._progress.update(t, completed=task.total or task.completed)
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


def _fail(e: BaseException) -> None:
    """One line on stderr, a non-zero exit; the traceback only with CKPTINIT_DEBUG=1."""
    if os.environ.get("CKPTINIT_DEBUG"):
        raise e
    if isinstance(e, CkptInitError):
        msg, code = str(e), e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        msg, code = "interrupted", 130
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"unexpected {type(e).__name__}: {first} (set CKPTINIT_DEBUG=1 for the traceback)"
        code = 1
    typer.echo(f"Error: {msg}", err=True)
    raise typer.Exit(code)


@app.command()
def rescale(
    source: SourceArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .safetensors file.",
                                         rich_help_panel=OUTPUT, show_default=False)],
    within: Annotated[bool | None, typer.Option(
        "--within/--no-within", help="Within-layer step (default: for units without loaded "
        "weights).", show_default=False, rich_help_panel=METHOD)] = None,
    between: Annotated[bool, typer.Option(
        "--between/--no-between", help="Between-layer rescaling of change rates.",
        rich_help_panel=METHOD)] = True,
    weights: Annotated[str | None, typer.Option(
        help="Weight draw for units of the within-layer step: keep, gaussian, orthogonal, pca, "
        "kmeans (default: gaussian for fresh units, keep for loaded).", show_default=False,
        rich_help_panel=METHOD)] = None,
    beta: Annotated[float, typer.Option(help="Target mean of every unit's outputs.",
                                        rich_help_panel=METHOD)] = 0.1,
    data: DataOpt = "samples",
    images: ImagesOpt = 64,
    batch_size: BatchOpt = 64,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    model_arg: ModelArgOpt = None,
    num_classes: NumClassesOpt = None,
    report: Annotated[Path | None, typer.Option(help="Write the per-unit report as JSON.",
                                                rich_help_panel=OUTPUT)] = None,
    plot: Annotated[Path | None, typer.Option(help="Plot per-unit change rates (PNG).",
                                              rich_help_panel=OUTPUT)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output.",
                                        rich_help_panel=OUTPUT)] = False,
    quiet: QuietOpt = False,
) -> None:
    """Initialise or rescale a model from calibration images and write a safetensors file."""
    try:
        from .api import rescale_checkpoint
        from .options import CalibrationOptions, RescaleOptions, SourceOptions

        opts = RescaleOptions(within=within, between=between, weights=weights, beta=beta,
                              batch_size=batch_size, seed=seed, device=device)
        src = SourceOptions(num_classes=num_classes, model_args=parse_model_args(model_arg))
        cal = CalibrationOptions(data=data, images=images, seed=seed)
        ui = _Ui(quiet)
        with ui:
            run = rescale_checkpoint(source, output, options=opts, source_options=src,
                                     calib_options=cal, force=force, progress=ui.progress)
        _finish(ui, run, report, plot)
        typer.echo(str(output))
    except (CkptInitError, Exception, KeyboardInterrupt) as e:
        _fail(e)


def _finish(ui: _Ui, run, report_path: Path | None, plot_path: Path | None) -> None:
    from .console import print_report
    from .report import plot_rates

    print_report(run, ui.console)
    if report_path:
        run.write_json(report_path)
    if plot_path:
        plot_rates(run, plot_path)


def main() -> None:
    app(prog_name="ckptinit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
