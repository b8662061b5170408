"""The command line (`ckptinit`): a thin layer of wiring over the library.

app.py holds the Typer app; rescale.py, push.py, measure.py and info.py one command each;
options.py the shared option aliases and the one conversion of their values into option
objects; errors.py the one error-to-message table; ui.py the stderr console and progress;
render.py what the commands print; outputs.py the report and plot files; command_line.py
the command as the report and model card record it. Heavy imports
(torch, timm, rich rendering) happen inside the commands so that --help is instant.
Results go to stdout; progress, tables, warnings and errors to stderr.
"""

from .app import Command, app
from .info import info
from .measure import measure
from .push import push
from .rescale import rescale

for _command in (rescale, push, measure, info):  # registered in the order --help lists them
    app.command(cls=Command)(_command)


def main() -> None:
    app(prog_name="ckptinit")


__all__ = ["app", "main"]
