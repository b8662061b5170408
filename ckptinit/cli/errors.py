"""The one place where failures become an `Error: ...` line on stderr and an exit code.

Exit codes: 0 success; 2 the command line is wrong (unknown or missing option, a value out
of range, an unknown choice, options that conflict or do not apply: `UsageError` and
Click's own errors); 1 everything else (a source, data, output or device that cannot be
used, the function check, an unexpected error); 130 interrupted (Ctrl-C, SIGINT); 143
terminated (SIGTERM). Library errors (errors.CkptInitError) carry their exit code and a
one-line message saying what to do next; anything else is shown as one line too. The
traceback only with CKPTINIT_DEBUG=1.

SIGTERM is turned into an exception (`Terminated`) for as long as a command runs, so that
it unwinds like Ctrl-C does and every writer removes its temporary file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import typer

from ..errors import CkptInitError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(BaseException):
    """SIGTERM arrived: unwind (writers clean up on BaseException), then exit 143."""


def debug() -> bool:
    return bool(os.environ.get("CKPTINIT_DEBUG"))


def click_errors() -> tuple[type[BaseException], ...]:
    """The exception classes of the Click that Typer runs on: its vendored copy (Typer 0.2x
    and later expose them as `typer.TyperException`), else the `click` package."""
    base = getattr(typer, "TyperException", None)
    if base is None:  # older Typer, on the click package
        import click

        base = click.ClickException
    return base, typer.Exit, typer.Abort


def message_and_code(e: BaseException) -> tuple[str, int]:
    """The one line (without 'Error: ') and the exit code for any failure."""
    click_error = click_errors()[0]
    if isinstance(e, CkptInitError):
        return " ".join(str(e).split()), e.exit_code
    if isinstance(e, Terminated):
        return "terminated (SIGTERM); nothing more was written", EXIT_TERMINATED
    if isinstance(e, (KeyboardInterrupt, typer.Abort)):
        return "interrupted; nothing more was written", EXIT_INTERRUPTED
    if isinstance(e, click_error):
        msg = " ".join(e.format_message().split())
        msg += "" if msg.endswith((".", "?")) else "."
        ctx = getattr(e, "ctx", None)
        if e.exit_code == EXIT_USAGE and ctx is not None:
            msg += f" See '{ctx.command_path} --help'."
        return msg, e.exit_code
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"unexpected {type(e).__name__}: {first} (set CKPTINIT_DEBUG=1 for the traceback)",
            EXIT_ERROR)


def fail(e: BaseException) -> None:
    """One line on stderr, a non-zero exit; the traceback only with CKPTINIT_DEBUG=1.

    Under torchrun the line names the rank, a rank stopped because another one failed (a
    lost peer, torchrun's SIGTERM) says nothing (the failing rank's line is the message),
    and the process ends at once: the other ranks see its connections close now rather
    than after the seconds torch takes to tear an interpreter down."""
    if debug():
        raise e
    msg, code = message_and_code(e)
    world = os.environ.get("WORLD_SIZE", "1")
    if world in ("", "1"):
        typer.echo(f"Error: {msg}", err=True)
        raise typer.Exit(code)
    if not (getattr(e, "silent", False) or isinstance(e, Terminated)):
        typer.echo(f"Error: rank {os.environ.get('RANK', '?')} of {world}: {msg}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the writers have cleaned up already: the exception has unwound


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Every command runs inside this: failures become `Error: ...` lines and exit codes."""
    click_error, exit_, _ = click_errors()
    try:
        yield
    except (exit_, click_error):
        raise
    except (Exception, KeyboardInterrupt, Terminated) as e:
        fail(e)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside: SIGTERM raises `Terminated` in the main thread (once; a second SIGTERM
    during the clean-up is ignored). The previous handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
