"""Rendering: the unit table at any width, number format."""

from __future__ import annotations

import re

import pytest

from ckptinit import __version__


def _fake_report(n: int = 300):
    from ckptinit.report import FunctionCheck, RunReport, UnitRecord

    units = []
    for i in range(n):
        u = UnitRecord(name=f"stages.{i // 50}.blocks.{i % 50}.mlp.fc{i % 2 + 1}",
                       kind="Linear", shape=(384, 96), action="gaussian+normalize",
                       draw="gaussian", mean_before=1.5, std_before=12.0, mean_after=0.1,
                       std_after=1.0, scale=0.08, rate_before=10.0 ** (i % 5),
                       rate_after=20.0, r=1.7, between_status="ok",
                       compensation=f"batchnorm stages.{i // 50}.blocks.{i % 50}.norm")
        units.append(u)
    units[3].between_status, units[3].between_reason = "pinned", "output goes through gelu"
    return RunReport(version=__version__, command="rescale", units=units,
                     source={"source": "x", "architecture": "x"}, between_iterations=1,
                     converged=True, function_check=FunctionCheck(1e-6, 1e-4, True, 16))


@pytest.mark.parametrize("width", [80, 120, 160])
def test_table_keeps_names_whole_at_any_width(width):
    from io import StringIO

    from rich.console import Console

    from ckptinit.cli.render import print_report

    report = _fake_report()
    buf = StringIO()
    print_report(report, Console(file=buf, width=width, force_terminal=False))
    text = buf.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    names = {m for line in lines for m in re.findall(r"(?<!\S)(stages\.\S+)(?!\S)", line)}
    assert names == {u.name for u in report.units}  # never wrapped or cut
    assert sum(1 for line in lines if ".mlp.fc" in line) == len(report.units)  # one row each
    assert "Summary:" in text and "1 pinned" in " ".join(text.split())
    if width == 160:
        assert "rate" in text and "compensation" in text and "columns left out" not in text
    if width == 80:
        assert "columns left out" in text


def test_number_format():
    from ckptinit.cli.render import fmt_num

    assert [fmt_num(x) for x in (None, 0.0, 1.0, 0.05812, 167.2, 2830.4, 2.13e-5, 1.07e6)] == [
        "-", "0", "1", "0.0581", "167", "2.83e3", "2.13e-5", "1.07e6"]
