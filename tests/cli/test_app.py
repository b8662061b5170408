"""The app: help, entry points, --version, and an instant --help that imports no torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptinit import __version__
from ckptinit.cli import app
from tests.cli.helpers import invoke


@pytest.mark.parametrize("command", [[], ["rescale"], ["push"], ["measure"], ["info"]])
def test_help_exits_zero(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_rescale_help_lists_the_option_groups():
    result = CliRunner().invoke(app, ["rescale", "--help"], env={"COLUMNS": "200"})
    for text in ("Model", "Calibration data", "Method", "Output", "--grad-batches",
                 "--strip-prefix", "--key-map", "--mean", "--patch-budget", "--function-tol",
                 "HF_TOKEN"):
        assert text in result.output, text


def test_push_help_lists_its_options():
    result = CliRunner().invoke(app, ["push", "--help"], env={"COLUMNS": "200"})
    for text in ("FOLDER", "REPO_ID", "--private", "--revision", "--create-pr",
                 "--commit-message", "--token", "HF_TOKEN", "--force"):
        assert text in result.output, text


def _script() -> Path | None:
    exe = Path(sys.executable).parent / ("ckptinit.exe" if os.name == "nt" else "ckptinit")
    return exe if exe.exists() else None


def test_console_script_help_is_fast_and_imports_no_torch():
    script = _script()
    cmd = [str(script), "--help"] if script else [sys.executable, "-m", "ckptinit", "--help"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    for command in ("rescale", "push", "measure", "info"):
        assert command in proc.stdout, command
    assert elapsed < 5, f"--help took {elapsed:.1f}s"
    probe = ("import sys, ckptinit.cli; heavy = [m for m in ('torch', 'timm', 'safetensors', "
             "'matplotlib', 'datasets') if m in sys.modules]; print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at CLI import time: {proc.stdout}"


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "ckptinit", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "rescale" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ckptinit", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == f"ckptinit {__version__}"


@pytest.mark.parametrize("command", [[], ["rescale"], ["measure"], ["info"]])
def test_help_fits_80_columns_as_plain_text(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    assert "\x1b[" not in result.output and "╭" not in result.output  # no markup, no boxes
    if command in (["rescale"], ["measure"]):
        assert "hf-hub:org/repo[@revision]" in " ".join(result.output.split())
    if command == ["rescale"]:
        assert len(lines) < 131  # 130 with --memory-format
        for section in ("Arguments:", "Model:", "Calibration data:", "Method:", "Output:"):
            assert section in lines, section


@pytest.mark.parametrize("args, contains", [
    (["rescale", "test_resnet"], "Missing option '--output' / '-o'"),
    (["rescale", "test_resnet", "-o", "x.safetensors", "--imagse", "3"], "--images"),
    (["rescale", "test_resnet", "-o", "x.safetensors", "--seed", "abc"], "--seed"),
    (["rescale", "test_resnet", "-o", "x.safetensors", "--mean", "1", "2"], "--mean"),
    (["bogus"], "No such command 'bogus'"),
    (["measure", "test_resnet", "--json", "m.json"], "unexpected extra argument"),
])
def test_click_usage_errors_are_one_error_line(args, contains):
    from tests.cli.helpers import assert_one_line_error

    err = assert_one_line_error(invoke(*args), 2, contains)
    assert "Usage:" not in err and "╭" not in err


def test_output_and_side_file_suffixes_are_both_usage_errors(tmp_path):
    from tests.cli.helpers import assert_one_line_error

    assert_one_line_error(invoke("rescale", "test_resnet", "-o", tmp_path / "out.pt"), 2,
                          ".safetensors")
    assert_one_line_error(invoke("rescale", "test_resnet", "-o", tmp_path / "o.safetensors",
                                 "--report", tmp_path / "r.txt"), 2, ".json")
    assert list(tmp_path.iterdir()) == []


def test_no_command_shows_the_help():
    result = invoke()
    assert result.exit_code == 2
    assert "Usage:" in result.output and "rescale" in result.output
