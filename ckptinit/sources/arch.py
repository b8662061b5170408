"""The architecture of a checkpoint file: --arch, a timm config.json beside the file,
ckptinit's own metadata, or the checkpoint's 'arch' entry (MoCo, DINO), in that order."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._helpers import one_line
from ..errors import SourceError
from ..options import SourceOptions
from ..output.metadata import Header

log = logging.getLogger(__name__)

def resolve_architecture(
    p: Path, options: SourceOptions, header: Header, obj: Any
) -> tuple[str, str, int | None, dict, dict | None]:
    """arch, where it came from, num_classes, model_args, pretrained_cfg for a file."""
    cfg = read_config_beside(p)
    arch = arch_from = None
    num_classes: int | None = None
    model_args: dict = {}
    pcfg: dict | None = None
    if options.arch:
        arch, arch_from = options.arch, "option"
        if cfg is not None and _same_arch(cfg["architecture"], arch):
            num_classes, model_args, pcfg = cfg.get("num_classes"), cfg["model_args"], cfg["pcfg"]
        elif header.architecture and _same_arch(header.architecture, arch):
            num_classes = header.num_classes
            model_args = header.model_args(p.name)
    elif cfg is not None:
        arch, arch_from = cfg["architecture"], "config.json"
        num_classes, model_args, pcfg = cfg.get("num_classes"), cfg["model_args"], cfg["pcfg"]
    elif header.architecture:
        arch, arch_from = header.architecture, "metadata"
        num_classes = header.num_classes
        model_args = header.model_args(p.name)
    elif checkpoint_arch(obj):
        arch, arch_from = checkpoint_arch(obj), "checkpoint"
        log.info("Architecture %s taken from the checkpoint's own 'arch' entry", arch)
    if arch is None:
        raise SourceError(
            f"Cannot tell the architecture of {p.name}: no config.json beside it and no "
            "ckptinit metadata; pass --arch NAME (a timm model name, e.g. --arch resnet50)."
        )
    model_args = {**model_args, **options.model_args}
    model_args.pop("num_classes", None)
    if options.num_classes is not None:
        num_classes = options.num_classes
    if pcfg is not None and options.num_classes is not None:
        pcfg = {k: v for k, v in pcfg.items() if k != "num_classes"}
    return arch, arch_from, num_classes, model_args, pcfg


def checkpoint_arch(obj: Any) -> str | None:
    """A timm name stored by the training code: MoCo's "arch", DINO's args.arch."""
    if not isinstance(obj, Mapping):
        return None
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    for value in (obj.get("arch"), args.get("arch") if isinstance(args, Mapping) else None):
        if isinstance(value, str) and _is_timm(value):
            return value
    return None


def read_config_beside(p: Path) -> dict | None:
    """A timm config.json next to the file, normalised; None if absent or not timm's."""
    cfg_path = p.parent / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("Ignoring unreadable %s: %s", cfg_path, one_line(e))
        return None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        log.info("Ignoring %s: not a timm config (no 'architecture')", cfg_path)
        return None
    pcfg = cfg.get("pretrained_cfg")
    if not isinstance(pcfg, dict):  # legacy single-dict format
        pcfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features")}
    num_classes = cfg.get("num_classes", pcfg.get("num_classes"))
    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        model_args = {}
    pcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in pcfg.items()}
    return {
        "architecture": cfg["architecture"],
        "num_classes": num_classes if isinstance(num_classes, int) else None,
        "model_args": dict(model_args),
        "pcfg": pcfg,
    }


def _same_arch(a: str, b: str) -> bool:
    return a.split(".")[0] == b.split(".")[0]


def _is_timm(name: str) -> bool:
    import timm

    try:
        return bool(timm.is_model(name))
    except Exception:  # noqa: BLE001
        return False
