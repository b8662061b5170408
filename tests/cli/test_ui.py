"""What runs show on stderr: plain progress lines off a terminal, throttled, and --quiet
switching off the Hub's own download bars."""

from __future__ import annotations

import re

import pytest

from ckptinit.cli.ui import ProgressLines, progress_seconds
from ckptinit.errors import SourceError
from tests.cli.helpers import ARCH, TINY, invoke

LINE = re.compile(r"^\[ *\d+s\] ")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_at_most_one_per_gap_and_a_heartbeat():
    clock, lines = Clock(), []
    p = ProgressLines(lines.append, gap=5.0, heartbeat=30.0, clock=clock)
    for t in range(13):  # an update every second for 12 s
        clock.now = float(t)
        p.update("reading images", t, 12)
    assert lines == ["[     0s] reading images 0/12", "[     5s] reading images 5/12",
                     "[    10s] reading images 10/12"]
    clock.now = 12.5
    p.update("within-layer step on 16 units", 0, None)  # held back: the gap is not over
    p.tick()
    assert len(lines) == 3
    clock.now = 15.0
    p.tick()  # the held-back change, once the gap has passed
    assert lines[-1] == "[    15s] within-layer step on 16 units"
    clock.now = 44.0
    p.tick()  # unchanged and silent: nothing before the heartbeat
    assert len(lines) == 4
    clock.now = 45.0
    p.tick()
    assert lines[-1] == "[    45s] within-layer step on 16 units"


def test_progress_seconds_from_the_environment(monkeypatch):
    monkeypatch.setenv("CKPTINIT_PROGRESS_SECONDS", "0")
    assert progress_seconds() == 0
    monkeypatch.setenv("CKPTINIT_PROGRESS_SECONDS", "soon")
    assert progress_seconds() == 5.0


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTINIT_PROGRESS_SECONDS", "0")
    result = invoke("rescale", ARCH, "-o", tmp_path / "o.safetensors", *TINY)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if LINE.match(line)]
    stages = " | ".join(lines)
    for stage in ("loading model", "reading images", "within-layer step", "between-layer"):
        assert stage in stages, stages
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr  # no bars, no escapes


def test_progress_lines_are_throttled_by_default(tmp_path):
    result = invoke("rescale", ARCH, "-o", tmp_path / "o.safetensors", *TINY)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if LINE.match(line)]
    assert lines and "loading model" in lines[0]
    seconds = [int(line[1:].split("s]")[0]) for line in lines]
    assert all(b - a >= 5 for a, b in zip(seconds, seconds[1:])), lines


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_switches_off_the_hub_bars(tmp_path, monkeypatch, quiet):
    from huggingface_hub.utils import are_progress_bars_disabled

    import ckptinit.pipeline

    seen = []

    def stop(*args, **kwargs):
        seen.append(are_progress_bars_disabled())
        raise SourceError("stopped here")

    monkeypatch.setattr(ckptinit.pipeline, "rescale_checkpoint", stop)
    assert not are_progress_bars_disabled()
    result = invoke("rescale", ARCH, "-o", tmp_path / "o.safetensors", *(["-q"] if quiet else []))
    assert result.exit_code == 1 and "stopped here" in result.stderr
    assert seen == [quiet]
    assert not are_progress_bars_disabled()  # given back after the command
