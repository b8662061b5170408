"""The command that made a run, for the report and the model card: rebuilt from what click
parsed off the command line (in the command's own option order), never the token, local
paths reduced to their last name (the card may be published)."""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

SECRET = frozenset({"token"})  # never written, whatever its source
PATHS = frozenset({"source", "data", "output", "report", "plot", "folder"})
LOCAL_DIR = "local-dir:"


def _public(name: str, value: Any) -> str:
    text = str(value)
    if name not in PATHS or text == "-":
        return text
    if text.startswith(LOCAL_DIR):
        return LOCAL_DIR + Path(text[len(LOCAL_DIR):]).name
    if name in ("output", "report", "plot", "folder") or Path(text).expanduser().exists():
        return Path(text).name
    return text


def _words(param: Any, value: Any) -> Iterable[str]:
    """The words of one parameter (duck-typed: Typer may bring its own copy of click)."""
    name = param.name or ""
    if param.param_type_name == "argument":
        yield _public(name, value)
        return
    flags = [o for o in param.opts if o.startswith("--")] or list(param.opts)
    if getattr(param, "is_flag", False):
        if value:
            yield flags[0]
        elif param.secondary_opts:
            yield param.secondary_opts[0]
        return
    values = value if getattr(param, "multiple", False) else [value]
    for v in values:
        yield flags[0]
        if isinstance(v, (tuple, list)):  # nargs > 1, e.g. --mean R G B
            yield from (_public(name, x) for x in v)
        else:
            yield _public(name, v)


def command_line(ctx: typer.Context) -> str:
    """`ckptinit COMMAND ...` with the arguments and options given on the command line."""
    words = ["ckptinit", ctx.info_name or ctx.command.name or ""]
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if name in SECRET or getattr(source, "name", None) != "COMMANDLINE":
            continue
        words += list(_words(param, ctx.params.get(name)))
    return shlex.join(words)
