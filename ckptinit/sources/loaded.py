"""What a source became (`LoadedModel`) and what a file holds (`CheckpointInfo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._helpers import jsonable
from ..output.metadata import source_fields


@dataclass
class LoadedModel:
    """A model built for a source, and the provenance the report and metadata need."""

    model: nn.Module
    architecture: str
    source: str
    pretrained: bool  # the source carried weights
    loaded_keys: set[str] = field(default_factory=set)  # state_dict keys filled from the source
    missing_keys: list[str] = field(default_factory=list)  # model keys left at their fresh init
    dropped_keys: list[str] = field(default_factory=list)  # checkpoint keys not loaded (as stored)
    original_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as stored
    revision: str | None = None  # resolved commit for hub sources
    model_args: dict = field(default_factory=dict)  # kwargs the architecture was built with
    num_classes: int | None = None  # the model's number of classes (0: headless)
    notes: list[str] = field(default_factory=list)  # things the user should know, one line each
    kind: str = "timm"  # "timm", "hf-hub", "local-dir" or "file"
    path: str | None = None  # the file (or folder) read, for file and local-dir sources
    repo_id: str | None = None  # "org/repo" for hub sources (the model card's base_model)
    file_format: str | None = None  # "safetensors" or "pickle" for file sources
    arch_from: str | None = None  # "name", "option", "config.json", "metadata" or "checkpoint"
    nested_key: str | None = None  # e.g. "teacher" or "state_dict" ("/"-joined when deeper)
    stripped_prefixes: list[str] = field(default_factory=list)
    key_map: dict[str, str] = field(default_factory=dict)
    # model key -> (checkpoint shape, model shape), for same-name tensors that were dropped
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )

    def metadata(self) -> dict[str, str]:
        """String metadata for the safetensors header (written by output/metadata.py)."""
        return source_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for the report: what was loaded, from where, how, and what not."""
        return {
            "source": self.source,
            "kind": self.kind,
            "path": self.path,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "file_format": self.file_format,
            "architecture": self.architecture,
            "arch_from": self.arch_from,
            "num_classes": self.num_classes,
            "model_args": {k: jsonable(v) for k, v in self.model_args.items()},
            "pretrained": self.pretrained,
            "nested_key": self.nested_key,
            "stripped_prefixes": list(self.stripped_prefixes),
            "key_map": dict(self.key_map),
            "loaded_count": len(self.loaded_keys),
            "missing_count": len(self.missing_keys),
            "dropped_count": len(self.dropped_keys),
            "missing_keys": list(self.missing_keys),
            "dropped_keys": list(self.dropped_keys),
            "shape_mismatches": {
                k: {"checkpoint": list(a), "model": list(b)}
                for k, (a, b) in self.shape_mismatches.items()
            },
            "notes": list(self.notes),
        }


@dataclass
class CheckpointInfo:
    """What `ckptinit info FILE` shows; read without building a model."""

    path: str
    format: str  # "safetensors" or "pickle"
    file_size: int  # bytes
    tensor_count: int
    parameter_count: int  # elements over all tensors in the file
    dtypes: dict[str, int]  # torch dtype name -> number of tensors
    metadata: dict[str, str]  # safetensors header; for pickles, scalar top-level entries
    architecture: str | None = None
    arch_from: str | None = None  # "metadata", "config.json" or "checkpoint"
    num_classes: int | None = None
    model_args: dict = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)  # ckptinit's keys, if it wrote it
    sections: dict[str, int] = field(default_factory=dict)  # pickles: nested dict -> tensors
    common_prefix: str | None = None  # shared dotted key prefix of the largest section
