"""Write checkpoints: safetensors with string metadata, atomically, never over data by accident."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import OutputError
from .metadata import with_format

log = logging.getLogger(__name__)


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse early (before any work) an output that exists or cannot be written: a
    .safetensors file, or else a Hub-ready folder (output/folder.py)."""
    from .folder import check_folder, check_parent, is_folder_output

    path = Path(path)
    if is_folder_output(path):
        return check_folder(path, force)
    if path.exists() and not force:
        raise OutputError(f"Output '{path}' already exists; pass --force to overwrite it.")
    if path.is_dir():
        raise OutputError(f"Output '{path}' is a folder; give a file name ending in .safetensors.")
    return check_parent(path)


def state_for_saving(
    model: nn.Module, originals: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state_dict ready for safetensors: on CPU, contiguous, no shared storage.

    Tensors equal to the ones loaded from the source are written back as loaded (bit for
    bit, original dtype); changed ones are cast to their original dtype.
    """
    originals = originals or {}
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        orig = originals.get(key)
        if orig is not None and orig.shape == t.shape:
            same = torch.equal(orig.to(t.dtype), t)
            t = orig if same else t.to(orig.dtype)
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_storage or not t.is_contiguous():
            t = t.clone().contiguous()
        elif ptr is not None:
            seen_storage.add(ptr)
        out[key] = t
    return out


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    metadata: dict[str, str],
    *,
    originals: dict[str, torch.Tensor] | None = None,
    force: bool = False,
) -> Path:
    """Write `model` to `path` through a temporary file and a rename: no half-written output."""
    from safetensors.torch import save_file

    path = check_output(path, force)
    tensors = state_for_saving(model, originals)
    meta = with_format(metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        _sort_metadata_(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors)", path, len(tensors))
    return path


def _sort_metadata_(path: str) -> None:
    """Same run, same bytes: safetensors writes the metadata in hash order, so rewrite the
    header (same length, padded with spaces as the format allows) with sorted metadata."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text + b" " * (n - len(text)))
