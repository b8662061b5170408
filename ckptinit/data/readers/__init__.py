"""--data -> a `Source` of candidate images: one reader per kind behind one factory.

folder.py reads image files (the shipped samples, one image, a folder), tabular.py
dataset files on disk (parquet, arrow, webdataset, save_to_disk), hub.py Hugging Face Hub
dataset ids (streamed through stream.py). `open_source` picks the reader; `check_source`
raises, before any model is built, the failures that need no reader at all.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import DataError
from ...options import CalibrationOptions
from . import hub
from .base import IMAGE_EXTENSIONS, Candidate, Skip, Source
from .folder import folder_source, image_folder_source, samples_source, walk
from .tabular import (
    SHARD_KINDS,
    is_saved_dataset,
    saved_source,
    shard_files,
    shard_folder_source,
    shard_source,
)

__all__ = ["Candidate", "Skip", "Source", "check_source", "open_source"]


def open_source(options: CalibrationOptions, need: int) -> Source:
    """The reader for `options.data`: the samples, a local path, else a Hub dataset id."""
    data = options.data
    if data == "samples":
        return samples_source(options)
    path = Path(data).expanduser()
    if path.exists():
        return _local_source(path, options, need)
    if _looks_like_path(data):
        raise DataError(_missing_folder(data))
    return hub.hub_source(data, options, need)


def check_source(data: str) -> None:
    """Refuse, without reading anything, a missing folder or a Hub id while offline."""
    if data == "samples" or Path(data).expanduser().exists():
        return
    if _looks_like_path(data):
        raise DataError(_missing_folder(data))
    hub.check_online(data)


def _missing_folder(data: str) -> str:
    return (f"Data folder '{data}' does not exist; pass an image folder, a dataset id, or "
            "'samples'.")


def _looks_like_path(data: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else that names a file system path is one."""
    if data.startswith((".", "~", "/", "\\")) or "\\" in data or re.match(r"^[A-Za-z]:", data):
        return True
    if data.count("/") >= 2:
        return True
    return data.lower().endswith(IMAGE_EXTENSIONS + tuple(SHARD_KINDS) + (".zip",))


def _local_source(path: Path, options: CalibrationOptions, need: int) -> Source:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            return folder_source(path.parent, [path.name], options, kind="image", resolved=path)
        if suffix in SHARD_KINDS:
            return shard_source(path, SHARD_KINDS[suffix], {"train": [path]}, options, need)
        raise DataError(f"'{path}' is neither an image nor a dataset shard "
                        "(.parquet/.arrow/.tar); pass an image folder, a dataset id, or "
                        "'samples'.")
    if not path.is_dir():
        raise DataError(f"'{path}' is not a file or folder that can be read; pass an image "
                        "folder, a dataset id, or 'samples'.")
    if is_saved_dataset(path):
        return saved_source(path, options, need)
    files = walk(path)
    shards = shard_files(path, files)
    if shards:
        return shard_folder_source(path, shards, options, need)
    return image_folder_source(path, files, options)
