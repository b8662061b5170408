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

import logging
import os
from pathlib import Path

from ..errors import SourceError, UsageError
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

log = logging.getLogger(__name__)

# Options that only checkpoint files read (timm loads hf-hub: and local-dir: as they are).
FILE_ONLY = {"use_ema": "--use-ema", "strip_prefix": "--strip-prefix", "key_map": "--key-map"}


def load_source(source: str, options: SourceOptions | None = None) -> LoadedModel:
    """Resolve SOURCE (timm name, hf-hub:, local-dir: or a checkpoint file) into a model."""
    options = options or SourceOptions()
    pretrained = source.startswith(HUB_PREFIXES) or source.startswith(LOCAL_DIR_PREFIX)
    kind = "pretrained" if pretrained else _classify(source)
    check_options(source, kind, options)
    if pretrained or kind == "file":
        loaded = (load_pretrained if pretrained else load_file_source)(source, options)
        check_finite_weights(loaded)
        return loaded
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


def input_files(source: str) -> list[Path]:
    """The files a run reads for SOURCE (a checkpoint file, or the files of a local-dir:
    folder), so that an output can be refused that would replace one of them."""
    if source.startswith(LOCAL_DIR_PREFIX):
        folder = Path(source[len(LOCAL_DIR_PREFIX):]).expanduser()
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if source.startswith(HUB_PREFIXES):
        return []
    path = Path(source).expanduser()
    return [path] if path.is_file() else []


def check_options(source: str, kind: str, options: SourceOptions) -> None:
    """Refuse the source options that this kind of SOURCE would silently ignore."""
    given = [flag for name, flag in FILE_ONLY.items() if getattr(options, name)]
    if kind == "pretrained":
        prefix = source.split(":", 1)[0] + ":"
        if options.arch:
            given.insert(0, "--arch")
        if given:
            raise UsageError(f"{', '.join(given)} cannot be used with {prefix} sources: timm "
                             "loads them as they are, and their config.json names the "
                             "architecture; pass the weights file itself to use them.")
    elif kind == "timm":
        if options.arch and options.arch != source:
            raise UsageError(f"SOURCE '{source}' is an architecture name and --arch says "
                             f"'{options.arch}'; give only one.")
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(f"{', '.join(given)} {verb} only to checkpoint files; '{source}' "
                             "is an architecture name (fresh weights).")
    if options.trust_pickle and (kind != "file" or source.lower().endswith(".safetensors")):
        log.warning("--trust-pickle has no effect on %s: it only applies to pickle files",
                    source)


def check_finite_weights(loaded: LoadedModel) -> None:
    """Refuse weights with NaN or Inf (a diverged or damaged checkpoint), naming them: the
    method would spread them through every statistic."""
    from ..output.checkpoint import non_finite

    bad = non_finite({k: v for k, v in loaded.model.state_dict().items()
                      if k in loaded.loaded_keys})
    if bad:
        name = Path(loaded.path).name if loaded.path else loaded.source
        raise SourceError(f"{name} holds non-finite values (NaN/Inf) in {bad}; a diverged or "
                          "damaged checkpoint: use another one.")


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
        raise SourceError(f"Checkpoint file not found: {source}; check the path.")
    if "/" in source or os.sep in source or "\\" in source:
        hint = ""
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            hint = f" For a Hugging Face Hub repository use hf-hub:{source}."
        raise SourceError(f"No such file: {source}.{hint}")
    return "timm"
