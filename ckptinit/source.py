"""SOURCE -> model plus what was loaded (DESIGN 2). Library code: logs, never prints."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SourceError
from .options import SourceOptions

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model built for a source, and the provenance the report and metadata need."""

    model: nn.Module
    architecture: str
    source: str
    pretrained: bool  # the source carried weights
    loaded_keys: set[str] = field(default_factory=set)  # state_dict keys filled from the source
    missing_keys: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)
    original_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as stored
    revision: str | None = None
    model_args: dict = field(default_factory=dict)
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, str]:
        """String metadata for the safetensors header."""
        meta = {"architecture": self.architecture, "source": self.source}
        if self.revision:
            meta["source_revision"] = self.revision
        if self.model_args:
            meta["model_args"] = repr(self.model_args)
        if self.num_classes is not None:
            meta["num_classes"] = str(self.num_classes)
        if self.pretrained:
            meta["loaded_tensors"] = str(len(self.loaded_keys))
            meta["missing_keys"] = ",".join(self.missing_keys)
            meta["dropped_keys"] = ",".join(self.dropped_keys)
        return meta


def create_architecture(name: str, options: SourceOptions) -> nn.Module:
    """Build a timm architecture with fresh weights; unknown names get close suggestions."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `timm.list_models()`."
        raise SourceError(f"Unknown architecture '{name}'.{hint}")
    kwargs = dict(options.model_args)
    if options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise SourceError(f"Cannot build '{name}' with {kwargs}: {e}") from e


def load_source(source: str, options: SourceOptions | None = None) -> LoadedModel:
    """Resolve SOURCE (a timm architecture name) into a model."""
    options = options or SourceOptions()
    model = create_architecture(source, options)
    return LoadedModel(
        model=model,
        architecture=source,
        source=source,
        pretrained=False,
        model_args=dict(options.model_args),
        num_classes=options.num_classes,
    )
