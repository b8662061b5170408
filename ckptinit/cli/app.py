"""The Typer app: `ckptinit` and its --version. cli/__init__.py registers the commands on it
(rescale.py, measure.py, info.py), in the order the help lists them."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

app = typer.Typer(
    name="ckptinit",
    help="Data-dependent initialisation (Krähenbühl et al., ICLR 2016) for timm models and "
    "checkpoints: normalise every layer and equalise every layer's change rate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
