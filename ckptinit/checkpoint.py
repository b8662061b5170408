"""Deprecated alias, removed in 0.3: import from ckptinit.output.checkpoint instead."""

from .output.checkpoint import check_output, save_checkpoint, state_for_saving

__all__ = ["check_output", "save_checkpoint", "state_for_saving"]
