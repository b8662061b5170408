"""Deprecated alias, removed in 0.3: import from ckptinit.method.units instead."""

from .method.units import (
    UNIT_TYPES,
    Unit,
    UnitScan,
    batchnorms,
    calibration_mode,
    channel_shape,
    is_unit,
    removing,
    scan_units,
)

__all__ = [
    "UNIT_TYPES", "Unit", "UnitScan", "batchnorms", "calibration_mode", "channel_shape",
    "is_unit", "removing", "scan_units",
]  # fmt: skip
