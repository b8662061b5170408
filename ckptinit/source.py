"""Deprecated alias, removed in 0.3: import from ckptinit.sources instead."""

from .output.metadata import LIST_LIMIT as METADATA_LIST_LIMIT
from .sources import (
    HUB_PREFIXES,
    LOCAL_DIR_PREFIX,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    CheckpointInfo,
    LoadedModel,
    create_architecture,
    load_source,
    read_info,
)
from .sources.keys import EMA_KEYS, KNOWN_PREFIXES, NESTED_KEYS
from .sources.state import MAX_MISMATCH_FRACTION, MAX_MISMATCHES, MIN_MATCH_FRACTION

__all__ = [
    "EMA_KEYS", "HUB_PREFIXES", "KNOWN_PREFIXES", "LOCAL_DIR_PREFIX", "MAX_MISMATCHES",
    "MAX_MISMATCH_FRACTION", "METADATA_LIST_LIMIT", "MIN_MATCH_FRACTION", "NESTED_KEYS",
    "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "CheckpointInfo", "LoadedModel",
    "create_architecture", "load_source", "read_info",
]  # fmt: skip
