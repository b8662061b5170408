"""Checkpoint files: safetensors, or pickles loaded with `weights_only=True` unless the user
trusts them; a file becomes a model of its architecture with its tensors loaded."""

from __future__ import annotations

import argparse
import logging
import pickle
import re
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
from .state import load_state_into

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar", ".tar", ".pkl")


def existing_file(source: str) -> Path:
    p = Path(source).expanduser()
    if not p.exists():
        raise SourceError(f"Checkpoint file not found: {source}")
    if not p.is_file():
        raise SourceError(f"'{source}' is not a file; for a timm folder use local-dir:{source}")
    return p


def is_safetensors(p: Path) -> bool:
    """By suffix, else by sniffing the header (8-byte length then '{')."""
    if p.name.lower().endswith(SAFETENSORS_SUFFIXES):
        return True
    if p.name.lower().endswith(PICKLE_SUFFIXES):
        return False
    try:
        with p.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise SourceError(f"Cannot read {p}: {one_line(e)}") from e
    return len(head) == 9 and head[8:9] == b"{"


def load_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(p), device="cpu"), meta
    except Exception as e:
        raise SourceError(f"Cannot read {p.name} as safetensors: {one_line(e)}") from e


def torch_load(p: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True unless trusted; refusals name --trust-pickle."""
    try:
        if trust_pickle:
            log.warning("Unpickling %s with weights_only=False (--trust-pickle)", p)
            return torch.load(str(p), map_location="cpu", weights_only=False)
        # argparse.Namespace holds training args in many checkpoints (DINO, timm); it builds
        # a plain attribute bag, so it is allowed like timm does.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise SourceError(f"Cannot unpickle {p.name}: {one_line(e)}") from e
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        needs = f"`{found.group(1)}`" if found else "objects"
        raise UnsafePickleError(
            f"Refusing to unpickle {p.name}: it needs {needs} beyond tensors and plain "
            "containers, and unpickling can run code; pass --trust-pickle only if you trust "
            "where it came from."
        ) from e
    except Exception as e:
        raise SourceError(f"Cannot read {p.name} as a PyTorch checkpoint: {one_line(e)}") from e


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
