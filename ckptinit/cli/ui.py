"""What a command shows on stderr while it runs: the console, progress and logging.

On a terminal, progress is a Rich bar; elsewhere (a CI log, `nohup`, a pipe) it is plain
text lines, at most one every CKPTINIT_PROGRESS_SECONDS (5 by default), and a line now and
then during long silent stages so that a log never stalls for minutes. `--quiet` leaves
only errors, and switches off the Hugging Face Hub's own download bars too.
Rich is imported here, inside the methods, so that `ckptinit --help` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable

PROGRESS_SECONDS = 5.0  # default gap between two plain progress lines
HEARTBEAT_SECONDS = 30.0  # a line at least this often while a stage is silent


def progress_seconds() -> float:
    """CKPTINIT_PROGRESS_SECONDS, else the default; 0 prints every update."""
    raw = os.environ.get("CKPTINIT_PROGRESS_SECONDS")
    try:
        return max(0.0, float(raw)) if raw else PROGRESS_SECONDS
    except ValueError:
        return PROGRESS_SECONDS


class ProgressLines:
    """Progress as plain lines: a changed stage or count at most every `gap` seconds, the
    unchanged state again after `heartbeat` seconds of silence (from a daemon thread)."""

    def __init__(self, write: Callable[[str], None], gap: float,
                 heartbeat: float = HEARTBEAT_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._write, self._gap, self._heartbeat, self._clock = write, gap, heartbeat, clock
        self._start = clock()
        self._last: float | None = None  # when the last line was written
        self._state: tuple[str, int, int | None] | None = None
        self._shown: tuple[str, int, int | None] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="ckptinit-progress",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def update(self, stage: str, done: int, total: int | None) -> None:
        with self._lock:
            self._state = (stage, done, total)
            now = self._clock()
            if self._last is None or now - self._last >= self._gap:
                self._emit(now)

    def tick(self) -> None:
        """The heartbeat, once: a held-back change once the gap has passed, the unchanged
        state after `heartbeat` seconds of silence."""
        with self._lock:
            now = self._clock()
            if self._state is None or self._last is None:
                return
            changed = self._state != self._shown and now - self._last >= self._gap
            if changed or now - self._last >= self._heartbeat:
                self._emit(now)

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self._heartbeat)):
            self.tick()

    def _emit(self, now: float) -> None:
        stage, done, total = self._state
        count = f" {done}/{total}" if total else ""
        self._write(f"[{now - self._start:6.0f}s] {stage}{count}")
        self._last, self._shown = now, self._state


class Ui:
    """stderr console, progress and logging for one command."""

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
        # PIL warns about images near its decompression-bomb limit; decode.py skips and counts
        # them anyway, so the warning would only say it twice
        warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
        self._bar = None
        self._lines: ProgressLines | None = None
        self._tasks: dict[str, int] = {}
        self._hub_bars_off = False

    def __enter__(self):
        if self.quiet:
            self._hub_bars_off = _hub_bars(enable=False)
        elif self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=self.console, transient=True)
            self._bar.__enter__()
        else:
            stream = sys.stderr

            def write(line: str) -> None:
                stream.write(line + "\n")
                stream.flush()

            self._lines = ProgressLines(write, progress_seconds())
            self._lines.start()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        if self._lines is not None:
            self._lines.close()
        if self._hub_bars_off:
            _hub_bars(enable=True)

    def progress(self, stage: str, done: int, total: int | None) -> None:
        """Library progress callback: one line for the current stage (a bar when it has a
        total); a new stage replaces the previous one."""
        if self._lines is not None:
            self._lines.update(stage, done, total)
        if self._bar is None:
            return
        if stage not in self._tasks:
            for t in self._tasks.values():
                self._bar.remove_task(t)
            self._tasks = {stage: self._bar.add_task(stage, total=total)}
        self._bar.update(self._tasks[stage], completed=done, total=total)


def _hub_bars(enable: bool) -> bool:
    """Switch the Hugging Face Hub's tqdm bars (timm's downloads) off or back on; True when
    this call switched them off."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if enable:
        enable_progress_bars()
        return False
    if are_progress_bars_disabled():
        return False
    disable_progress_bars()
    return True
