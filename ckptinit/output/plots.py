"""The report's plot: every unit's change rate, before and after (matplotlib, on demand)."""

from __future__ import annotations

from pathlib import Path

from ..report import RunReport


def plot_rates(report: RunReport, path: str | Path) -> None:
    """Change rate per unit (log scale), before and after the between-layer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = [u for u in report.units if u.rate_before or u.rate_after]
    xs = range(len(units))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(units) + 2), 4), dpi=120)
    before = [u.rate_before or float("nan") for u in units]
    ax.semilogy(xs, before, "o-", ms=3, label="before")
    if any(u.rate_after for u in units) and report.between_iterations:
        after = [u.rate_after or float("nan") for u in units]
        ax.semilogy(xs, after, "s-", ms=3, label="after")
    pinned = [i for i, u in enumerate(units) if u.between_status == "pinned"]
    if pinned:
        ax.semilogy(pinned, [before[i] for i in pinned], "x", color="gray", label="pinned")
    ax.set_xlabel("unit (execution order)")
    ax.set_ylabel("change rate ||dL/dW|| / ||W||")
    ax.set_title(f"{report.source.get('architecture', '')}: per-layer change rates")
    if len(units) <= 40:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([u.name for u in units], rotation=90, fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
