"""CLI test setup: logging restored after each test, one shared rescale run."""

from __future__ import annotations

import logging
import warnings

import pytest

from tests.cli.helpers import ARCH, TINY, invoke


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    """The CLI configures the root logger and warnings capture; give other tests them back."""
    monkeypatch.delenv("CKPTINIT_DEBUG", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    filters = warnings.filters[:]
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    warnings.filters[:] = filters


@pytest.fixture(scope="package")
def run(tmp_path_factory) -> dict:
    """One rescale of a fresh architecture, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("rescale")
    out, report, plot = root / "init.safetensors", root / "report.json", root / "rates.png"
    result = invoke("rescale", ARCH, "-o", out, "--report", report, "--plot", plot, *TINY)
    assert result.exit_code == 0, result.output
    return {"out": out, "report": report, "plot": plot, "result": result}
