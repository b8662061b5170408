"""The checkpoint header's metadata: the one writer and the one reader of its keys.

A safetensors header holds str -> str metadata. ckptinit writes there how to rebuild the
model (`architecture`, `num_classes`, `model_args`), what ran (`ckptinit_version`,
`method`, `options`, `seed`), what was loaded from the source (`source`, `loaded_tensors`,
...) and the calibration images (`data_*`). `build_header` is the only code that writes
these keys and `read_header` the only code that reads them back; `info`, the architecture
of a file made by ckptinit, and the CLI's rendering all go through `Header`.

`ckptinit_schema` numbers the layout of these keys (SCHEMA_VERSION). A header without it
was written before the key existed and reads as schema 1. A header with a newer schema is
read all the same, as far as its keys are known, with one warning: a newer ckptinit may
have changed what a key means, so the reader says so rather than refusing the file.
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._helpers import cut, jsonable
from ..errors import SourceError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the writer reads these types; importing them would import torch
    from ..data.calibration import CalibrationInfo
    from ..sources.load import LoadedModel

FORMAT = {"format": "pt"}  # what safetensors.torch expects; first in every header
SCHEMA, SCHEMA_VERSION = "ckptinit_schema", 1  # the layout of the keys below
VERSION, METHOD, OPTIONS, SEED = "ckptinit_version", "method", "options", "seed"
SOURCE, SOURCE_REVISION = "source", "source_revision"
ARCHITECTURE, NUM_CLASSES, MODEL_ARGS = "architecture", "num_classes", "model_args"
REBUILD_KEYS = (ARCHITECTURE, NUM_CLASSES, MODEL_ARGS)  # how to build the model again
NOT_PROVENANCE = ("format", *REBUILD_KEYS)
DATA_PREFIX = "data_"
PROVENANCE_MARK = "ckptinit"  # a header with a key starting so was written by ckptinit
LIST_LIMIT = 20  # names kept in the header for long lists


# --------------------------------------------------------------------------- writer


def build_header(
    *, version: str, method: str, options: Mapping[str, Any], seed: int,
    loaded: LoadedModel, data: CalibrationInfo,
) -> dict[str, str]:
    """The metadata of a checkpoint written by `rescale_checkpoint` (before `FORMAT`)."""
    return {
        SCHEMA: str(SCHEMA_VERSION),
        VERSION: version,
        METHOD: method,
        OPTIONS: json.dumps(dict(options), sort_keys=True),
        SEED: str(seed),
        **source_fields(loaded),
        **data_fields(data),
    }


def with_format(metadata: Mapping[str, Any]) -> dict[str, str]:
    """What goes into the file: `FORMAT` first, every key and value as a string."""
    return {**FORMAT, **{str(k): str(v) for k, v in metadata.items()}}


def source_fields(lm: LoadedModel) -> dict[str, str]:
    """What was loaded from the source; long lists are cut, with counts.

    A file source is named by its file name only: the header may be published, and a
    local path says nothing useful to anyone else.
    """
    source = Path(lm.source).name if lm.kind == "file" else lm.source
    meta = {ARCHITECTURE: lm.architecture, SOURCE: source}
    if lm.revision:
        meta[SOURCE_REVISION] = lm.revision
    if lm.model_args:
        meta[MODEL_ARGS] = repr(lm.model_args)
    if lm.num_classes is not None:
        meta[NUM_CLASSES] = str(lm.num_classes)
    if lm.pretrained:
        meta["loaded_tensors"] = str(len(lm.loaded_keys))
        meta["missing_count"] = str(len(lm.missing_keys))
        meta["missing_keys"] = _join_head(lm.missing_keys)
        meta["dropped_count"] = str(len(lm.dropped_keys))
        meta["dropped_keys"] = _join_head(lm.dropped_keys)
        if lm.nested_key:
            meta["source_nested_key"] = lm.nested_key
        if lm.stripped_prefixes:
            meta["source_prefix"] = ",".join(lm.stripped_prefixes)
        if lm.key_map:
            meta["source_key_map"] = ",".join(f"{k}={v}" for k, v in lm.key_map.items())
    return meta


def data_fields(info: CalibrationInfo) -> dict[str, str]:
    """The calibration images as `data_*` keys; local paths are reduced to their name."""
    if info.kind == "hub":
        resolved = info.resolved
    elif info.kind == "samples":
        resolved = "samples"
    else:  # keep home-folder paths out of checkpoints that may be published
        resolved = Path(info.resolved).name
    values: dict[str, Any] = {
        "source": info.source,
        "kind": info.kind,
        "resolved": resolved,
        "images": info.num_images,
        "holdout": info.num_holdout,
        "distinct": info.distinct_sources,
        "augmented": info.augmented,
        "skipped": info.skipped,
        "seed": info.seed,
        "split": info.split,
        "revision": info.revision,
        "config": info.config,
        "shuffle_buffer": info.shuffle_buffer,
        "image_column": info.image_column,
        "available": info.available,
        "transform": json.dumps(jsonable(info.transform, fallback=None), sort_keys=True),
    }
    return {f"{DATA_PREFIX}{k}": str(v) for k, v in values.items() if v is not None}


def _join_head(names: list[str]) -> str:
    head = ",".join(names[:LIST_LIMIT])
    return head + (",..." if len(names) > LIST_LIMIT else "")


# --------------------------------------------------------------------------- reader


@dataclass
class Header:
    """A header read back: the fields ckptinit's own code uses, typed."""

    metadata: dict[str, str]  # every key, as stored
    architecture: str | None = None
    num_classes: int | None = None  # None when absent or not a number
    source: str | None = None
    source_revision: str | None = None
    provenance: dict[str, str] = field(default_factory=dict)  # {} unless ckptinit wrote it
    schema: int | None = None  # SCHEMA as written; None when absent (read as schema 1)

    def model_args(self, file_name: str) -> dict:
        """The `model_args` written as repr(dict), read back without eval."""
        value = self.metadata.get(MODEL_ARGS)
        if not value:
            return {}
        try:
            args = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise SourceError(
                f"{file_name}: cannot parse its model_args metadata ({cut(value, 80)}); "
                "pass --arch and --model-args instead."
            ) from e
        if not isinstance(args, dict):
            raise SourceError(f"{file_name}: model_args metadata is not a dict; pass --model-args.")
        return args

    def data(self) -> dict[str, str]:
        """The provenance's `data_*` keys, without the prefix."""
        n = len(DATA_PREFIX)
        return {k[n:]: v for k, v in self.provenance.items() if k.startswith(DATA_PREFIX)}


def read_header(metadata: Mapping[str, str], *, warn: bool = True) -> Header:
    """Parse a safetensors header's metadata (or a pickle's scalar entries).

    A schema newer than SCHEMA_VERSION (or one that is not a number) is logged as a
    warning unless `warn` is False (for a second reading of the same header).
    """
    meta = dict(metadata)
    header = Header(
        metadata=meta,
        architecture=meta.get(ARCHITECTURE),
        num_classes=_parse_int(meta.get(NUM_CLASSES)),
        source=meta.get(SOURCE),
        source_revision=meta.get(SOURCE_REVISION),
        schema=_parse_int(meta.get(SCHEMA)),
    )
    known = header.schema is not None and header.schema <= SCHEMA_VERSION
    if warn and SCHEMA in meta and not known:
        log.warning("Header written with %s=%s; this ckptinit reads schema %d: the keys it "
                    "knows are read as schema %d and may be misread; upgrade ckptinit.",
                    SCHEMA, meta[SCHEMA], SCHEMA_VERSION, SCHEMA_VERSION)
    if any(k.startswith(PROVENANCE_MARK) for k in meta):
        header.provenance = {k: v for k, v in meta.items() if k not in NOT_PROVENANCE}
    return header


def _parse_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
