"""Deprecated alias, removed in 0.3: import from ckptinit.method.stats instead."""

from .method.stats import Moments

__all__ = ["Moments"]
