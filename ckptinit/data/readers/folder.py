"""Image files: the shipped sample photos, one image, or a folder searched recursively
(`--split` picks a train/, val/, ... sub-folder)."""

from __future__ import annotations

import logging
import os
import random
from importlib import resources
from pathlib import Path

from ...errors import DataError
from ...options import CalibrationOptions
from .base import IMAGE_EXTENSIONS, Candidate, Source

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "training", "val", "valid", "validation", "test", "dev")


def samples_dir() -> Path:
    """Folder of the shipped sample photos: `samples/` at the top of the repository, which
    installs as the package data of `ckptinit.samples`; importlib.resources finds it in every
    kind of install (editable, wheel, `pip install --user`)."""
    folder = resources.files("ckptinit.samples")
    if not isinstance(folder, Path):  # a zip import: no folder on disk to read
        raise DataError("The sample photos cannot be read from a zipped install; install "
                        "ckptinit unzipped, or pass --data with an image folder.")
    return folder


def samples_source(options: CalibrationOptions) -> Source:
    """The sample photos shipped with ckptinit, in a seeded order."""
    folder = samples_dir()
    files = _list_images(folder) if folder.is_dir() else []
    if not files:
        raise DataError(f"The sample photos are missing (looked in '{folder}'); reinstall "
                        "ckptinit, or pass --data with an image folder.")
    return folder_source(folder, files, options, kind="samples")


def image_folder_source(path: Path, files: list[str], options: CalibrationOptions) -> Source:
    """The image files among `files` (relative to `path`), in the --split sub-folder if any."""
    images = [rel for rel in files if file_suffix(rel) in IMAGE_EXTENSIONS]
    images, resolved, notes = _image_split(path, images, options.split)
    if not images:
        raise DataError(f"No image files in folder '{resolved}' (looked for "
                        f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} and dataset shards "
                        f"among {len(files)} files); pass an image folder, a dataset id, or "
                        "'samples'.")
    src = folder_source(path, images, options, kind="folder", resolved=resolved)
    src.notes[:0] = notes
    return src


def file_suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > name.rfind("/") else ""


def walk(root: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden files under root, sorted; symlinked folders are
    followed once. Plain strings: an ImageNet-sized folder is 1.3M entries."""
    out: list[str] = []
    seen: set[str] = set()

    def onerror(err: OSError) -> None:
        log.warning("Cannot list %s: %s", err.filename, err.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # stable link choice
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out.extend(prefix + f for f in filenames if not f.startswith("."))
    out.sort()
    return out


def _list_images(folder: Path) -> list[str]:
    return [rel for rel in walk(folder) if file_suffix(rel) in IMAGE_EXTENSIONS]


def _image_split(root: Path, images: list[str], split: str | None
                 ) -> tuple[list[str], Path, list[str]]:
    """--split on an image folder picks a sub-folder of that name (train/, val/, ...)."""
    if split is None:
        return images, root, []
    if (root / split).is_dir():
        prefix = split.strip("/") + "/"
        return ([rel for rel in images if rel.startswith(prefix)], root / split,
                [f"split '{split}': sub-folder '{prefix}'"])
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in SPLIT_FOLDERS)
    if present:
        raise DataError(f"Folder '{root}' has no '{split}' sub-folder; splits found: "
                        f"{', '.join(present)}.")
    log.warning("--split '%s' ignored: folder '%s' has no split sub-folders", split, root)
    return images, root, [f"--split '{split}' ignored: the folder has no split sub-folders"]


def folder_source(root: Path, files: list[str], options: CalibrationOptions, kind: str,
                   resolved: Path | None = None) -> Source:
    """Files (relative to root) in a seeded order; candidates are made lazily."""
    order = list(files)
    random.Random(options.seed).shuffle(order)
    notes = ([f"{len(files)} sample photos shipped with ckptinit"] if kind == "samples"
             else [f"{len(files)} image files in '{resolved or root}'"])
    return Source(kind=kind, resolved=str((resolved or root).resolve()),
                   candidates=(Candidate(rel, root / rel) for rel in order),
                   available=len(files), notes=notes)
