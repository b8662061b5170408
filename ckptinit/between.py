"""Deprecated alias, removed in 0.3: import from ckptinit.method.between, .moves and .rates
instead."""

from .method.between import EPS_BUDGET, BetweenResult, norm_floors, rescale_between_
from .method.moves import ABSORBERS, Group, Plan, describe, plan_moves
from .method.rates import Rates, estimate_rates

__all__ = [
    "ABSORBERS", "EPS_BUDGET", "BetweenResult", "Group", "Plan", "Rates", "describe",
    "estimate_rates", "norm_floors", "plan_moves", "rescale_between_",
]  # fmt: skip
