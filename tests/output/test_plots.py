"""The two plots: one point per unit, pinned and excluded units marked, real PNG files, and
no pyplot state touched."""

from __future__ import annotations

import math
import subprocess
import sys

from PIL import Image

from ckptinit.output.plots import (
    RATES_PNG,
    STATISTICS_PNG,
    plot_all,
    rates_figure,
    statistics_figure,
)
from tests.output.helpers import make_report


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_rates_one_point_per_unit_log_scale_pinned_and_excluded_marked():
    report = make_report()
    (ax,) = rates_figure(report).axes
    lines = _lines(ax)
    n = len(report.units)
    for label in ("before", "after"):
        assert len(lines[label].get_xdata()) == n
    before = list(lines["before"].get_ydata())
    assert before[0] == 1.0 and before[3] == 1000.0
    assert math.isnan(before[2])  # a zero rate (no gradient) is a gap on a log scale
    assert ax.get_yscale() == "log"
    assert list(lines["pinned (1)"].get_xdata()) == [1]
    assert list(lines["excluded, no gradient (1)"].get_xdata()) == [2]
    assert [t.get_text() for t in ax.get_xticklabels()] == [u.name for u in report.units]


def test_statistics_mean_and_std_before_and_after():
    report = make_report()
    top, bottom = statistics_figure(report).axes
    for ax, stat in ((top, "mean"), (bottom, "std")):
        lines = _lines(ax)
        assert list(lines["before"].get_ydata()) == [getattr(u, f"{stat}_before")
                                                     for u in report.units]
        assert list(lines["after"].get_ydata()) == [getattr(u, f"{stat}_after")
                                                    for u in report.units]


def test_without_rates_the_plot_says_so():
    report = make_report()
    for u in report.units:
        u.rate_before = u.rate_after = None
    (ax,) = rates_figure(report).axes
    assert ax.get_lines() == []
    assert "no change rates" in ax.texts[0].get_text()


def test_png_files_open_as_images(tmp_path):
    paths = plot_all(make_report(), tmp_path)
    assert [p.name for p in paths] == [RATES_PNG, STATISTICS_PNG]
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_no_pyplot_and_the_backend_is_left_alone(tmp_path):
    probe = (
        "import sys, matplotlib; matplotlib.use('svg'); "
        "from ckptinit.output.plots import plot_all; "
        "from tests.output.helpers import make_report; "
        f"plot_all(make_report(), {str(tmp_path)!r}); "
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False"]
    assert (tmp_path / RATES_PNG).read_bytes()[:4] == b"\x89PNG"
