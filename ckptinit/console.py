"""Deprecated alias, removed in 0.3: import from ckptinit.cli.render instead."""

from .cli.render import (
    ARCH_FROM,
    COMPENSATION_WIDTH,
    DROP_ORDER,
    STATUS_STYLE,
    fmt_num,
    info_dict,
    print_info,
    print_report,
    source_line,
    summary_line,
    unit_table,
)

__all__ = [
    "ARCH_FROM", "COMPENSATION_WIDTH", "DROP_ORDER", "STATUS_STYLE", "fmt_num", "info_dict",
    "print_info", "print_report", "source_line", "summary_line", "unit_table",
]  # fmt: skip
