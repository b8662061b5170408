"""The report's two plots: per-unit change rates and per-unit output statistics, before and
after (matplotlib's object API only: no pyplot state, no `matplotlib.use`, so a notebook's
backend and figures are left alone).

Every unit of the report gets one x position, in forward order; a value that was not
measured (or a change rate that is zero, which a log scale cannot show) is left as a gap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..report import RunReport

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn, not with the package
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RATES_PNG, STATISTICS_PNG = "change_rates.png", "statistics.png"  # the names in a folder
LABELLED_UNITS = 40  # up to this many units, every unit's name is written under the axis
NAN = float("nan")


def _value(x: float | None, positive: bool = False) -> float:
    if x is None or not math.isfinite(x) or (positive and x <= 0):
        return NAN
    return float(x)


def _figure(report: RunReport, rows: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    width = max(6.0, 0.18 * len(report.units) + 2)
    fig = Figure(figsize=(width, 3.2 * rows + 0.8), dpi=120, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _unit_axis(ax: Axes, report: RunReport) -> None:
    names = [u.name for u in report.units]
    ax.set_xlabel("unit (forward order)")
    if len(names) <= LABELLED_UNITS:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)


def _title(report: RunReport, what: str) -> str:
    arch = (report.source or {}).get("architecture")
    return f"{arch}: {what}" if arch else what


def rates_figure(report: RunReport) -> Figure:
    """Change rate ||dL/dW|| / ||W|| per unit (log scale), before and after; pinned units
    are marked with a cross, excluded ones (no gradient) with a triangle at the bottom."""
    fig, (ax,) = _figure(report, 1)
    units = report.units
    xs = range(len(units))
    before = [_value(u.rate_before, positive=True) for u in units]
    after = [_value(u.rate_after, positive=True) for u in units]
    drawn = False
    if any(not math.isnan(v) for v in before):
        ax.plot(xs, before, "o-", ms=3, lw=1, label="before")
        drawn = True
    if any(not math.isnan(v) for v in after):
        ax.plot(xs, after, "s-", ms=3, lw=1, label="after")
        drawn = True
    pinned = [i for i, u in enumerate(units) if u.between_status == "pinned"]
    if drawn and pinned:
        marks = [after[i] if not math.isnan(after[i]) else before[i] for i in pinned]
        ax.plot(pinned, marks, "x", ms=8, color="black", ls="none",
                label=f"pinned ({len(pinned)})")
    excluded = [i for i, u in enumerate(units) if u.between_status == "excluded"]
    if drawn and excluded:  # no gradient: a rate of zero, marked on the bottom edge
        ax.plot(excluded, [0.02] * len(excluded), "v", ms=5, color="gray", ls="none",
                transform=ax.get_xaxis_transform(), label=f"excluded, no gradient "
                f"({len(excluded)})")
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no change rates measured (between-layer step skipped)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("change rate ||dL/dW|| / ||W||")
    ax.set_title(_title(report, "per-unit change rates"))
    ax.grid(True, which="both", alpha=0.3)
    _unit_axis(ax, report)
    return fig


def statistics_figure(report: RunReport) -> Figure:
    """Per-unit output mean (top) and std (bottom), averaged over channels, before and
    after the within-layer step."""
    fig, axes = _figure(report, 2)
    units = report.units
    xs = range(len(units))
    for ax, stat in zip(axes, ("mean", "std")):
        for when, style in (("before", "o-"), ("after", "s-")):
            values = [_value(getattr(u, f"{stat}_{when}")) for u in units]
            if any(not math.isnan(v) for v in values):
                ax.plot(xs, values, style, ms=3, lw=1, label=when)
        ax.set_ylabel(f"output {stat}")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_title(_title(report, "per-unit output mean and std (over channels)"))
    _unit_axis(axes[-1], report)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write the figure; the format follows the file name (.png, .svg, .pdf)."""
    fig.savefig(path)
    return Path(path)


def plot_rates(report: RunReport, path: str | Path) -> Path:
    """The change-rate plot as a file (what --plot writes)."""
    return save_figure(rates_figure(report), path)


def plot_all(report: RunReport, folder: str | Path) -> Sequence[Path]:
    """Both plots into `folder`, under the names a Hub folder uses."""
    folder = Path(folder)
    return (save_figure(rates_figure(report), folder / RATES_PNG),
            save_figure(statistics_figure(report), folder / STATISTICS_PNG))
