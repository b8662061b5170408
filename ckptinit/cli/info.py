"""`ckptinit info FILE`: what a checkpoint holds, without building a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .errors import cli_errors
from .options import JsonOpt, QuietOpt, TrustPickleOpt
from .ui import Ui


def info(
    file: Annotated[Path, typer.Argument(
        metavar="FILE", show_default=False,
        help="A checkpoint file (.safetensors, or a pickle: .pth, .pt, .bin).")],
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what a checkpoint holds: format, tensors, architecture and ckptinit provenance.

    Reads only the header of a safetensors file; builds no model.
    """
    with cli_errors():
        Ui(quiet)  # logging and warnings on stderr
        from ..sources import read_info
        from .render import info_dict, print_info

        result = read_info(file, trust_pickle=trust_pickle)
        if as_json:
            typer.echo(json.dumps(info_dict(result), indent=2, default=str))
        else:
            from rich.console import Console

            print_info(result, Console(soft_wrap=True))
