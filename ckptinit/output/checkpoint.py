"""Write checkpoints: safetensors with string metadata, atomically, never over data by accident."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import OutputError, UsageError
from .atomic import atomic_path, check_writable
from .metadata import with_format

log = logging.getLogger(__name__)


def check_output(path: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse early (before any work) an output that exists, cannot be written, or would
    replace one of the `inputs` (the files the run reads): a .safetensors file, or else a
    Hub-ready folder (output/folder.py)."""
    from .folder import check_folder, is_folder_output

    path = Path(path)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise UsageError(f"Output '{path}' is the input '{source}'; write to another file "
                             "(the input is only read).")
        if _inside(Path(source), path):
            raise UsageError(f"Output '{path}' is the input folder (it holds '{source}'); "
                             "write to another folder (the input is only read).")
    if is_folder_output(path):
        return check_folder(path, force)
    if path.exists() and not path.is_dir() and not force:
        raise OutputError(f"Output '{path}' already exists; pass --force to overwrite it.")
    check_writable(path, "output")
    return path


def _inside(file: Path, folder: Path) -> bool:
    """`file` lies in the folder `folder` (an output folder that holds an input)."""
    try:
        return folder.is_dir() and file.exists() and os.path.samefile(file.parent, folder)
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


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
    """Write `model` to `path` through a temporary file and a rename: no half-written output,
    and no output at all when a tensor holds NaN or Inf (in its saved dtype)."""
    from safetensors.torch import save_file

    path = check_output(path, force)
    tensors = state_for_saving(model, originals)
    check_finite(tensors, f"Refusing to write '{path}'")
    meta = with_format(metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_metadata_(tmp)
    log.info("wrote %s (%d tensors)", path, len(tensors))
    return path


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """None when every floating tensor is finite, else one phrase naming the bad ones:
    "2 tensor(s): conv1.weight (float32: 3 NaN); fc.bias (float16: 1 Inf)"."""
    bad = []
    for name, t in tensors.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        counts = [f"{n} {kind}" for n, kind in ((int(torch.isnan(t).sum()), "NaN"),
                                                (int(torch.isinf(t).sum()), "Inf")) if n]
        bad.append(f"{name} ({str(t.dtype).replace('torch.', '')}: {', '.join(counts)})")
    if not bad:
        return None
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"{len(bad)} tensor(s): {'; '.join(bad[:3])}{more}"


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """OutputError naming the tensors with NaN or Inf (a changed float16 tensor that left
    the float16 range shows up here as Inf)."""
    bad = non_finite(tensors)
    if bad:
        raise OutputError(f"{what}: non-finite values in {bad}; nothing was written (a "
                          "float16 value beyond 65504 becomes Inf). Try --no-between, or "
                          "report it with the command line.")


def _sort_metadata_(path: str | Path) -> None:
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
