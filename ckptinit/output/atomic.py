"""Atomic writes: a hidden temporary file beside the target, renamed over it only once it is
complete, and removed on any failure or interruption (Ctrl-C, SIGTERM through the CLI), so
that an output either exists whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError

TMP_TAG = ".tmp"  # every temporary name holds it: `.NAME.XXXXXXXX.tmp.SUFFIX`


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (with the permissions
    the umask gives new files), on any exception it is deleted.

    The temporary name ends in the target's suffix, so writers that pick the format from
    the name (matplotlib) write the right one.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{TMP_TAG}{path.suffix}",
                                    dir=folder)
        tmp = Path(name)
        os.close(fd)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; follow the umask
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def check_writable(path: Path, what: str) -> None:
    """OutputError, before any work, when `path` cannot be written as a new file: it is a
    folder, or its parent cannot take it (check_parent)."""
    if path.is_dir():
        raise OutputError(f"{what[:1].upper()}{what[1:]} '{path}' is a folder; give a file "
                          "name.")
    check_parent(path, what)


def check_parent(path: Path, what: str = "output") -> Path:
    """OutputError when the folder that would hold `path` (a file or a folder) cannot: a
    file stands where a folder should be, the folder is missing or read-only."""
    parent = path.parent if str(path.parent) else Path(".")
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"Cannot write {what} '{path}': '{blocker}' is a file, not a folder.")
    if not parent.is_dir():
        raise OutputError(f"Cannot write {what} '{path}': folder '{parent}' does not exist; "
                          "create it first.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"Cannot write {what} '{path}': folder '{parent}' is not writable; "
                          "choose another folder.")
    return path
