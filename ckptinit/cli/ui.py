"""What a command shows on stderr while it runs: the console, progress bars and logging.

Rich is imported here, inside the methods, so that `ckptinit --help` stays instant.
"""

from __future__ import annotations

import logging
import os


class Ui:
    """stderr console, progress bars and logging for one command."""

    def __init__(self, quiet: bool):
        from rich.console import Console
        from rich.logging import RichHandler

        # huggingface_hub and datasets print their warnings (e.g. every network retry) through
        # handlers of their own; keep them to errors, set before they are first imported
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            self.console.width = 160  # logs and CI: do not squeeze the table into 80 columns
        level = logging.DEBUG if os.environ.get("CKPTINIT_DEBUG") else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", force=True,
                            handlers=[RichHandler(console=self.console, show_path=False,
                                                  show_time=False)])
        logging.captureWarnings(True)  # library warnings through the same (quiet-able) console
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
                                  console=self.console, transient=True,
                                  disable=self.quiet or not self.console.is_terminal)
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def progress(self, stage: str, done: int, total: int | None) -> None:
        """Library progress callback: one line for the current stage (a bar when it has a
        total); a new stage replaces the previous one."""
        if stage not in self._tasks:
            for t in self._tasks.values():
                self._progress.remove_task(t)
            self._tasks = {stage: self._progress.add_task(stage, total=total)}
        self._progress.update(self._tasks[stage], completed=done, total=total)
