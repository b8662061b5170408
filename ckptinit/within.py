"""Deprecated alias, removed in 0.3: import from ckptinit.method.within instead."""

from .method.within import DEAD_RTOL, WithinResult, measure_outputs, normalize_within_

__all__ = ["DEAD_RTOL", "WithinResult", "measure_outputs", "normalize_within_"]
