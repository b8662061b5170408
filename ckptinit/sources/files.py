"""Checkpoint files: safetensors, or pickles loaded with `weights_only=True` unless the user
trusts them; a file becomes a model of its architecture with its tensors loaded."""

from __future__ import annotations

import argparse
import logging
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .._helpers import one_line
from ..errors import SourceError, UnsafePickleError
from ..options import SourceOptions
from ..output.metadata import read_header
from .arch import resolve_architecture
from .loaded import LoadedModel
from .pretrained import create_architecture, model_num_classes
from .sniff import TORCH_LEGACY_MAGIC, check_safetensors_header, sniff
from .state import load_state_into

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar", ".tar", ".pkl")


def existing_file(source: str) -> Path:
    p = Path(source).expanduser()
    if not p.exists():
        raise SourceError(f"Checkpoint file not found: {source}; check the path.")
    if not p.is_file():
        raise SourceError(f"'{source}' is not a file; for a timm folder use local-dir:{source}")
    return p


def is_safetensors(p: Path) -> bool:
    """By content (a `.pth` may hold safetensors); anything that is neither safetensors nor
    a pickle is refused here, named for what it is (sniff.py)."""
    return sniff(p) == "safetensors"


def load_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    check_safetensors_header(p)
    try:
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(p), device="cpu"), meta
    except Exception as e:
        raise SourceError(f"{p.name} is corrupt: safetensors cannot read it ({one_line(e)}); "
                          "fetch it again.") from e


def torch_load(p: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True unless trusted. A file that is merely corrupt or
    truncated is named so, and only one that really needs other objects is refused with
    the advice to pass --trust-pickle."""
    kind = sniff(p)
    names: set[str] = set()
    if kind == "zip":
        _check_zip(p)
    else:
        names = _scan_pickles(p)
    try:
        if trust_pickle:
            log.warning("Unpickling %s with weights_only=False (--trust-pickle)", p)
            return torch.load(str(p), map_location="cpu", weights_only=False)
        # argparse.Namespace holds training args in many checkpoints (DINO, timm); it builds
        # a plain attribute bag, so it is allowed like timm does.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if kind == "pickle" and not any(n.startswith("torch.") for n in names):
            raise SourceError(f"{p.name} is a pickle of plain Python objects with no tensors "
                              "in it, not a checkpoint.") from e
        needs = [] if trust_pickle else _unsafe_globals(p, kind, e)
        if needs:
            raise UnsafePickleError(
                f"Refusing to unpickle {p.name}: it needs {', '.join(f'`{n}`' for n in needs)} "
                "beyond tensors and plain containers, and unpickling can run code; pass "
                "--trust-pickle only if you trust where it came from."
            ) from e
        if kind == "pickle" and not trust_pickle:  # sound, but beyond the safe loader
            raise UnsafePickleError(
                f"Refusing to unpickle {p.name}: it is a plain pickle (pickle.dump, not "
                "torch.save) that torch's safe loader cannot read, and unpickling can run "
                "code; pass --trust-pickle only if you trust where it came from, or re-save "
                "it with torch.save."
            ) from e
        raise _corrupt(p, e) from e
    except (EOFError, RuntimeError) as e:  # torch's zip reader raises RuntimeError
        raise _corrupt(p, e) from e
    except Exception as e:
        raise SourceError(f"Cannot read {p.name} as a PyTorch checkpoint: "
                          f"{type(e).__name__}: {one_line(e)}") from e


def _corrupt(p: Path, e: BaseException) -> SourceError:
    text = one_line(e, 120).rstrip(".")
    truncated = isinstance(e, EOFError) or any(
        w in text for w in ("truncated", "exhausted", "central directory", "EOF", "Ran out"))
    what = "truncated" if truncated else "corrupt"
    return SourceError(f"{p.name} is {what}: {type(e).__name__}: {text}; fetch it again.")


def _check_zip(p: Path) -> None:
    """A torch.save zip archive: complete, with a data.pkl inside."""
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceError(f"{p.name} is truncated or corrupt: an incomplete zip archive "
                          f"({one_line(e, 80)}); fetch it again.") from e
    if not any(n.endswith("data.pkl") for n in names):
        raise SourceError(f"{p.name} is a zip archive of {len(names)} file(s) (e.g. "
                          f"{', '.join(names[:2]) or 'none'}), not a torch.save checkpoint.")


def _scan_pickles(p: Path) -> set[str]:
    """The globals a pickle file names, read without running it (pickletools); a legacy
    torch.save file is several pickles in a row. Raises when the pickle itself is broken."""
    names: set[str] = set()
    with p.open("rb") as f:
        legacy = f.read(len(TORCH_LEGACY_MAGIC)) == TORCH_LEGACY_MAGIC
        f.seek(0)
        for _ in range(5 if legacy else 1):  # magic, protocol, sys info, object, storages
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        names.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.add(f"{strings[-2]}.{strings[-1]}")
                    if isinstance(arg, str):
                        strings.append(arg)
            except Exception as e:  # noqa: BLE001 - genops raises ValueError and others
                raise _corrupt(p, e) from e
    return names


def _unsafe_globals(p: Path, kind: str, e: BaseException) -> list[str]:
    """The globals weights_only refused; [] when the file is merely broken."""
    if kind == "zip":
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
        except Exception:  # noqa: BLE001 - an unreadable archive needs no trust
            return []
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return [found.group(1)] if found else []


def load_file_source(source: str, options: SourceOptions) -> LoadedModel:
    p = existing_file(source)
    if is_safetensors(p):
        obj, meta, fmt = *load_safetensors(p), "safetensors"
    else:
        obj, meta, fmt = torch_load(p, options.trust_pickle), {}, "pickle"
    header = read_header(meta)
    arch, arch_from, num_classes, model_args, pcfg = resolve_architecture(p, options, header, obj)
    build = SourceOptions(num_classes=num_classes, model_args=model_args)
    model = create_architecture(arch, build, pretrained_cfg=pcfg)
    lm = LoadedModel(
        model=model,
        architecture=arch,
        source=source,
        pretrained=True,
        kind="file",
        path=str(p),
        file_format=fmt,
        arch_from=arch_from,
        model_args=dict(model_args),
        num_classes=model_num_classes(model, num_classes),
        key_map=dict(options.key_map),
    )
    if header.source_revision:
        lm.notes.append(f"file was made from {header.source}@{header.source_revision}")
    load_state_into(lm, obj, options)
    return lm
