"""`ckptinit info FILE`: what a checkpoint holds, without building a model."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._helpers import cut, one_line
from ..errors import SourceError
from ..output.metadata import read_header
from .arch import checkpoint_arch, read_config_beside
from .files import existing_file, is_safetensors, torch_load
from .keys import candidate_dicts, common_dotted_prefix
from .loaded import CheckpointInfo
from .sniff import check_safetensors_header


def read_info(path: str | os.PathLike, trust_pickle: bool = False) -> CheckpointInfo:
    """Summarise a checkpoint file without building a model (safetensors: header only)."""
    p = existing_file(str(path))
    size = p.stat().st_size
    obj = None
    if is_safetensors(p):
        info = _safetensors_info(p, size)
    else:
        obj = torch_load(p, trust_pickle)
        info = _pickle_info(p, size, obj)
    header = read_header(info.metadata)
    if header.architecture:
        info.architecture, info.arch_from = header.architecture, "metadata"
        info.num_classes = header.num_classes
        info.model_args = header.model_args(p.name)
    else:
        cfg = read_config_beside(p)
        if cfg is not None:
            info.architecture, info.arch_from = cfg["architecture"], "config.json"
            info.num_classes = cfg.get("num_classes")
            info.model_args = cfg.get("model_args") or {}
        elif info.format == "pickle" and checkpoint_arch(obj):
            info.architecture, info.arch_from = checkpoint_arch(obj), "checkpoint"
    info.provenance = header.provenance
    return info


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


def _safetensors_info(p: Path, size: int) -> CheckpointInfo:
    from safetensors import safe_open

    check_safetensors_header(p)
    dtypes: Counter[str] = Counter()
    count = 0
    n = 0
    try:
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            for k in keys:
                s = f.get_slice(k)
                dtypes[_SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype().lower())] += 1
                shape = s.get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                count += numel
                n += 1
    except Exception as e:
        raise SourceError(f"{p.name} is corrupt: safetensors cannot read it ({one_line(e)}); "
                          "fetch it again.") from e
    return CheckpointInfo(
        path=str(p),
        format="safetensors",
        file_size=size,
        tensor_count=n,
        parameter_count=count,
        dtypes=dict(dtypes),
        metadata=meta,
        common_prefix=common_dotted_prefix(keys) or None,
    )


def _pickle_info(p: Path, size: int, obj: Any) -> CheckpointInfo:
    dtypes: Counter[str] = Counter()
    sections: dict[str, int] = {}
    seen: set[int] = set()
    count = n = 0
    biggest: list[str] = []
    for path, tensors in candidate_dicts(obj, use_ema=False):
        sections[path or ""] = len(tensors)
        if len(tensors) > len(biggest):
            biggest = list(tensors)
        for t in tensors.values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            n += 1
            count += t.numel()
            dtypes[str(t.dtype).replace("torch.", "")] += 1
    meta: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(k, str) and isinstance(v, (str, int, float, bool)):
                meta[k] = str(v)
            elif isinstance(k, str) and isinstance(v, argparse.Namespace):
                meta[k] = cut(repr(vars(v)), 500)
    return CheckpointInfo(
        path=str(p),
        format="pickle",
        file_size=size,
        tensor_count=n,
        parameter_count=count,
        dtypes=dict(dtypes),
        metadata=meta,
        sections=sections,
        common_prefix=common_dotted_prefix(biggest) or None,
    )
