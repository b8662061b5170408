"""Rich rendering for the CLI (the library never imports rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .report import RunReport

STATUS_STYLE = {"ok": "green", "dead": "yellow", "fallback": "yellow", "pinned": "cyan",
                "excluded": "magenta", "not converged": "red", "skipped": "dim"}


def _f(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _arrow(before: float | None, after: float | None) -> str:
    return _f(before) if after is None else f"{_f(before)}→{_f(after)}"


def unit_table(report: RunReport) -> Table:
    """One row per unit: what it was, what was done, what it measured before and after."""
    between = report.between_iterations > 0 or any(u.rate_before for u in report.units)
    table = Table(title=f"ckptinit {report.command}: {report.source.get('source', '')}",
                  header_style="bold", show_lines=False, expand=False)
    for col, just in [("#", "right"), ("unit", "left"), ("kind", "left"), ("shape", "left"),
                      ("action", "left"), ("mean", "right"), ("std", "right"),
                      ("scale", "right")]:
        table.add_column(col, justify=just, no_wrap=col in ("unit", "shape"))
    if between:
        for col in ("rate before", "rate after", "r", "compensation"):
            table.add_column(col, justify="left" if col == "compensation" else "right")
    table.add_column("status")
    for i, u in enumerate(report.units):
        mean, std = _arrow(u.mean_before, u.mean_after), _arrow(u.std_before, u.std_after)
        status = u.status if u.between_status in (None, "ok") else u.between_status
        style = STATUS_STYLE.get(status, "")
        row = [str(i), u.name, u.kind, "x".join(map(str, u.shape)), u.action, mean, std,
               _f(u.scale)]
        if between:
            row += [_f(u.rate_before), _f(u.rate_after), _f(u.r), u.compensation or "-"]
        row.append(f"[{style}]{status}[/]" if style else status)
        table.add_row(*row)
    return table


def print_report(report: RunReport, console: Console) -> None:
    console.print(unit_table(report))
    for line in report.notes:
        console.print(f"[dim]•[/] {line}")
    fc = report.function_check
    if fc is not None:
        verdict = "enforced" if fc.enforced else "not enforced"
        console.print(f"[dim]•[/] output change on {fc.images} held-out images: "
                      f"{fc.rel_change:.2e} (tolerance {fc.tolerance:g}, {verdict})")
