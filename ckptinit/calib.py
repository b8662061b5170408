"""Deprecated alias, removed in 0.3: import from ckptinit.data instead."""

from .data import CalibrationInfo, CalibrationSet, check_data, load_calibration, samples_dir
from .data.readers.base import IMAGE_EXTENSIONS
from .data.readers.folder import SPLIT_FOLDERS
from .data.readers.hub import HUB_ALIASES
from .data.readers.tabular import SHARD_KINDS, SHARD_PRIORITY
from .data.transforms import CROP_RATIO, CROP_SCALE, INTERPOLATIONS, resolve_data_config

__all__ = [
    "CROP_RATIO", "CROP_SCALE", "HUB_ALIASES", "IMAGE_EXTENSIONS", "INTERPOLATIONS",
    "SHARD_KINDS", "SHARD_PRIORITY", "SPLIT_FOLDERS", "CalibrationInfo", "CalibrationSet",
    "check_data", "load_calibration", "resolve_data_config", "samples_dir",
]  # fmt: skip
