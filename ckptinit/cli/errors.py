"""The one place where failures become an `Error: ...` line on stderr and an exit code.

Library errors (errors.CkptInitError) carry their exit code and a one-line message saying
what to do next; anything else is an unexpected error, shown as one line too. The
traceback only with CKPTINIT_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import typer

from ..errors import CkptInitError


def fail(e: BaseException) -> None:
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
def cli_errors() -> Iterator[None]:
    """Every command runs inside this: failures become `Error: ...` lines and exit codes."""
    import click

    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except (Exception, KeyboardInterrupt) as e:
        fail(e)
