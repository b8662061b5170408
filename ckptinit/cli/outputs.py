"""The side files of a run: the JSON report (--report, --json; '-' for stdout) and the plot
(--plot), refused before any work when they cannot be written, written after the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from ..errors import UsageError

PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_side_file(path: Path | None, what: str, suffixes: tuple[str, ...]) -> None:
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


def write_outputs(run, json_path: Path | None, plot_path: Path | None) -> list[str]:
    """The report as JSON ('-': stdout) and the plot; returns the paths written."""
    written = []
    if json_path is not None:
        if str(json_path) == "-":
            typer.echo(json.dumps(run.to_dict(), indent=2, default=str))
        else:
            run.write_json(json_path)
            written.append(str(json_path))
    if plot_path is not None:
        from ..output.plots import plot_rates

        plot_rates(run, plot_path)
        written.append(str(plot_path))
    return written
