"""Deprecated alias, removed in 0.3: import from ckptinit.method.units and ckptinit.method.trace
instead."""

from .method.trace import NORM_TYPES, Follower, trace_followers
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
    "NORM_TYPES", "UNIT_TYPES", "Follower", "Unit", "UnitScan", "batchnorms",
    "calibration_mode", "channel_shape", "is_unit", "removing", "scan_units", "trace_followers",
]  # fmt: skip
