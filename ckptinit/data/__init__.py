"""--data -> calibration images.

calibration.py runs it (select, fill in with crops, record provenance); readers/ turns
--data into candidate images, one reader per kind; decode.py decodes them, transforms.py
preprocesses them the model's way.
"""

from .calibration import CalibrationInfo, CalibrationSet, ProgressFn, check_data, load_calibration
from .readers.folder import samples_dir
from .transforms import resolve_data_config

__all__ = [
    "CalibrationInfo",
    "CalibrationSet",
    "ProgressFn",
    "check_data",
    "load_calibration",
    "resolve_data_config",
    "samples_dir",
]
