"""A streamed `datasets` dataset (a Hub id, or local arrow/webdataset shards) -> candidates:
the image column, then shuffle(seed, buffer) and only then take(images + holdout)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..._helpers import one_line
from ...errors import DataError
from ...options import CalibrationOptions
from .base import Candidate, Source, column_from_example, column_from_features


def stream_source(ds: Any, options: CalibrationOptions, need: int, label: str) -> Source:
    """A streamed dataset: pick the image column, shuffle(seed, buffer) THEN take(need)."""
    features = getattr(ds, "features", None)
    columns = list(features) if features else list(getattr(ds, "column_names", None) or [])
    column = options.image_column or column_from_features(features)
    if options.image_column and columns and options.image_column not in columns:
        raise DataError(f"Column '{options.image_column}' not found in '{label}'; columns: "
                        f"{', '.join(columns)}.")
    if column is not None and columns:
        ds = ds.select_columns([column])
    if hasattr(ds, "decode"):
        ds = ds.decode(False)  # raw bytes: decoding happens in our thread pool
    ds = ds.shuffle(seed=options.seed, buffer_size=options.shuffle_buffer)
    ds = ds.take(need)  # after shuffle: take() first would freeze the shard order
    src = Source(kind="hub", resolved=label, candidates=(), streaming=True,
                  image_column=column)

    def candidates() -> Iterator[Candidate]:
        count = 0
        iterator = iter(ds)
        while True:
            try:
                example = next(iterator)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"Streaming '{label}' failed after {count} examples: "
                                f"{type(e).__name__}: {one_line(e, 200, tidy=False)}") from None
            if count == 0 and src.image_column is not None and src.image_column not in example:
                raise DataError(f"Column '{src.image_column}' not found in '{label}'; columns: "
                                f"{', '.join(example)}.")
            if src.image_column is None:
                src.image_column = column_from_example(example)
                if src.image_column is None:
                    raise DataError(f"No image column found in '{label}'; columns: "
                                    f"{', '.join(example)}. Pass --image-column.")
            yield Candidate(f"example {count}", example.get(src.image_column))
            count += 1

    src.candidates = candidates()
    return src
