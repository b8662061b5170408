"""Deprecated alias, removed in 0.3: import from ckptinit.method.between, .moves and .rates
instead."""

from .method.between import BetweenResult, rescale_between_
from .method.moves import Plan, apply_scales_, plan_moves
from .method.rates import Rates, estimate_rates

__all__ = [
    "BetweenResult", "Plan", "Rates", "apply_scales_", "estimate_rates", "plan_moves",
    "rescale_between_",
]  # fmt: skip
