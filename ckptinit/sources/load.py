"""SOURCE -> model plus what was loaded (DESIGN 2). Library code: logs, never prints.

A source is a timm architecture name (fresh weights), `hf-hub:org/repo[@rev]` or
`local-dir:PATH` (loaded by timm's own loaders, pretrained.py), or a checkpoint file
(`.safetensors`, or a pickle loaded with `weights_only=True` unless the user trusts it,
files.py). Files written by other code bases are unwrapped (nested dicts, key prefixes,
keys.py) by matching names and shapes against the architecture (arch.py, state.py), so
that self-supervised backbones load without hand surgery, and everything that was not
loaded is listed rather than silently lost.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SourceError
from ..options import SourceOptions
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, load_file_source
from .loaded import LoadedModel
from .pretrained import (
    HUB_PREFIXES,
    LOCAL_DIR_PREFIX,
    create_architecture,
    load_pretrained,
    model_num_classes,
)


def load_source(source: str, options: SourceOptions | None = None) -> LoadedModel:
    """Resolve SOURCE (timm name, hf-hub:, local-dir: or a checkpoint file) into a model."""
    options = options or SourceOptions()
    if source.startswith(HUB_PREFIXES) or source.startswith(LOCAL_DIR_PREFIX):
        return load_pretrained(source, options)
    kind = _classify(source)
    if kind == "file":
        return load_file_source(source, options)
    arch = options.arch
    if arch and arch != source:
        raise SourceError(
            f"SOURCE '{source}' is an architecture name and --arch says '{arch}'; give only one."
        )
    model = create_architecture(source, options)
    return LoadedModel(
        model=model,
        architecture=source,
        source=source,
        pretrained=False,
        model_args=dict(options.model_args),
        num_classes=model_num_classes(model, options.num_classes),
        arch_from="name",
    )


def _classify(source: str) -> str:
    """Tell a checkpoint path ("file") from a timm name ("timm"); refuse folders and typos."""
    p = Path(source).expanduser()
    if p.is_file():
        return "file"
    if p.is_dir():
        raise SourceError(
            f"'{source}' is a folder: use local-dir:{source} (config.json + weights)."
        )
    lower = source.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise SourceError(f"Checkpoint file not found: {source}")
    if "/" in source or os.sep in source or "\\" in source:
        hint = ""
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            hint = f" For a Hugging Face Hub repository use hf-hub:{source}."
        raise SourceError(f"No such file: {source}.{hint}")
    return "timm"
