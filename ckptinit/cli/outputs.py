"""The side files of a run: the JSON report (--report, --json; '-' for stdout) and the plot
(--plot), refused before any work when they cannot be written, written after the run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import UsageError
from ..output.atomic import check_writable

PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_side_file(path: Path | None, what: str, suffixes: tuple[str, ...]) -> None:
    """Refuse before any work a report or plot path that cannot be written: a wrong suffix
    is a usage error (exit 2), a missing or read-only folder an output error (1), as for
    the checkpoint itself."""
    if path is None or str(path) == "-":
        return
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{what} '{path}' must end in {' or '.join(suffixes)}.")
    check_writable(path, what)


def write_outputs(run, report_path: Path | None, plot_path: Path | None,
                  as_json: bool = False) -> list[str] | None:
    """The report as JSON and the plot, each written whole or not at all; the paths written,
    or None when the JSON went to stdout (--json, or --report -) and stdout must hold
    nothing else."""
    from ..output.atomic import atomic_path

    written = []
    to_stdout = as_json or str(report_path) == "-"
    if report_path is not None and str(report_path) != "-":
        with atomic_path(report_path) as tmp:
            run.write_json(tmp)
        written.append(str(report_path))
    if plot_path is not None:
        from ..output.plots import plot_rates

        with atomic_path(plot_path) as tmp:
            plot_rates(run, tmp)
        written.append(str(plot_path))
    if to_stdout:
        typer.echo(json.dumps(run.to_dict(), indent=2, default=str))
        return None
    return written
