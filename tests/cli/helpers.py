"""Shared by the CLI tests: a tiny architecture and inputs, invoking, one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from ckptinit.cli import app

ARCH = "test_resnet"  # timm's smallest ResNet: 16 units, ~0.5M parameters
TINY = ["--device", "cpu", "--input-size", "32", "--images", "8", "--holdout", "4",
        "--batch-size", "8", "--grad-batches", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int | None = None, contains: str = "") -> str:
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # warnings may come first; the error is last
    err = lines[-1]
    assert err.startswith("Error: "), result.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1, result.stderr
    assert contains.lower() in err.lower(), err
    return err
