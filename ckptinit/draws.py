"""Deprecated alias, removed in 0.3: import from ckptinit.method.draws and ckptinit.method.patches
instead."""

from .method.draws import (
    DUPLICATE_COS,
    KMEANS_MAX_ITER,
    KMEANS_POINTS_PER_CENTRE,
    KMEANS_TOL,
    DrawResult,
    draw_weight_,
)
from .method.patches import EPS_REL, RANDOMIZED_MIN_DIM, RANDOMIZED_POWER_ITERS, RANK_REL

__all__ = [
    "DUPLICATE_COS", "EPS_REL", "KMEANS_MAX_ITER", "KMEANS_POINTS_PER_CENTRE", "KMEANS_TOL",
    "RANDOMIZED_MIN_DIM", "RANDOMIZED_POWER_ITERS", "RANK_REL", "DrawResult", "draw_weight_",
]  # fmt: skip
