"""The Typer app: `ckptinit` and its --version. cli/__init__.py registers the commands on it
(rescale.py, measure.py, info.py), in the order the help lists them.

Two Click classes adjust Typer's defaults: `Group.main` turns Click's own usage errors into
one `Error: ...` line (exit 2) instead of a box, and makes SIGTERM unwind (cli/errors.py);
`Command` prints the help as plain text, one section per option group, so that nothing in
it is read as markup (`[@revision]`) and it fits 80 columns.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from .errors import Terminated, click_errors, debug, message_and_code, sigterm_unwinds


class Group(TyperGroup):
    """The `ckptinit` group: one-line errors for everything Click itself refuses."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any
             ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        click_error, _, abort = click_errors()
        with sigterm_unwinds():
            try:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except (click_error, abort, Terminated, KeyboardInterrupt) as e:
                if debug() and not isinstance(e, click_error):
                    raise
                if type(e).__name__ == "NoArgsIsHelpError":  # `ckptinit` alone: the help
                    typer.echo(e.format_message(), err=True)
                    sys.exit(e.exit_code)
                msg, code = message_and_code(e)
                if os.environ.get("RANK", "0") in ("", "0"):  # torchrun: every rank parses
                    typer.echo(f"Error: {msg}", err=True)  # the same command line
                sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


class Command(TyperCommand):
    """Plain-text help: the arguments, then one section per option group (rich_help_panel)."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                title, record = "Arguments", (param.metavar or param.name.upper(), record[1])
            else:
                title = getattr(param, "rich_help_panel", None) or "Options"
            sections.setdefault(title, []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


app = typer.Typer(
    name="ckptinit",
    cls=Group,
    help="Data-dependent initialisation (Krähenbühl et al., ICLR 2016) for timm models and "
    "checkpoints: normalise every layer and equalise every layer's change rate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
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
