"""Ctrl-C and SIGTERM at every stage: exit 130 or 143, one line, and nothing left on disk
(no output, no temporary file). The child pauses at the stage (interrupt_child.py) and
this test sends the real signal, with SIGINT at its default disposition (REFERENCE.md,
"Testing interruption": a child that inherits an ignored SIGINT would test nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.cli.helpers import ARCH, TINY

ROOT = Path(__file__).resolve().parents[2]
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_and_signal(stage: str, sig: signal.Signals, folder: Path,
                   output: str = "out.safetensors") -> tuple[int, str]:
    """Start `rescale` paused at `stage`, send `sig` there; returns (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("CKPTINIT_DEBUG", None)
    args = [sys.executable, "-m", "tests.cli.interrupt_child", stage, "rescale", ARCH,
            "-o", str(folder / output), "--report", str(folder / "report.json"),
            *TINY]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    lines: list[str] = []
    paused = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(f"PAUSED {stage}"):
                paused.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert paused.wait(240), f"never reached {stage}: {''.join(lines)[-2000:]}"
        proc.send_signal(sig)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    return code, "".join(lines)


STAGES = ("reading", "within", "between", "writing")
DEFAULT = {("reading", signal.SIGINT), ("within", signal.SIGTERM), ("between", signal.SIGINT),
           ("writing", signal.SIGTERM)}  # both signals and every stage; the rest are slow


@pytest.mark.parametrize("stage, sig", [
    pytest.param(stage, sig, id=f"{stage}-{sig.name}",
                 marks=() if (stage, sig) in DEFAULT else pytest.mark.slow)
    for stage in STAGES for sig in (signal.SIGINT, signal.SIGTERM)])
def test_signal_mid_run_leaves_nothing(stage, sig, tmp_path):
    _check(*run_and_signal(stage, sig, tmp_path), sig, tmp_path)


def test_sigint_while_writing_a_hub_folder_leaves_no_half_folder(tmp_path):
    _check(*run_and_signal("writing", signal.SIGINT, tmp_path, output="model-folder"),
           signal.SIGINT, tmp_path)


def _check(code: int, err: str, sig: signal.Signals, tmp_path: Path) -> None:
    assert code == CODES[sig], err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: ") and WORDS[sig] in last, err[-2000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "output or temporary file left"
