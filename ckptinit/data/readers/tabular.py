"""Datasets on disk: parquet shards (exact seeded row sample, reading only the row groups it
needs), arrow and webdataset shards (streamed), and `datasets.save_to_disk` folders."""

from __future__ import annotations

import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import DataError
from ...options import CalibrationOptions
from .base import (
    Candidate,
    Source,
    column_from_example,
    column_from_features,
    data_errors,
    quiet_datasets,
)
from .folder import file_suffix
from .stream import stream_source

log = logging.getLogger(__name__)

SHARD_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
SHARD_PRIORITY = ("parquet", "arrow", "webdataset")
_SAVED_MARKERS = (("state.json", "dataset_info.json"), ("dataset_dict.json",))
_FULL_SHUFFLE_MAX = 1 << 20  # up to this many rows a full permutation; above, rejection sampling


def is_saved_dataset(path: Path) -> bool:
    """A `datasets.save_to_disk` folder (a Dataset or a DatasetDict)."""
    return any(all((path / m).is_file() for m in markers) for markers in _SAVED_MARKERS)


def shard_files(root: Path, files: list[str]) -> dict[str, list[Path]]:
    """The dataset shards among `files` (relative to root), by kind."""
    by_kind: dict[str, list[Path]] = {}
    for rel in files:
        kind = SHARD_KINDS.get(file_suffix(rel))
        if kind:
            by_kind.setdefault(kind, []).append(root / rel)
    return by_kind


def shard_folder_source(root: Path, by_kind: dict[str, list[Path]], options: CalibrationOptions,
                        need: int) -> Source:
    """A folder of shards: the preferred kind, grouped by split the way the Hub does."""
    kind = next(k for k in SHARD_PRIORITY if k in by_kind)
    splits = _split_shards(root, by_kind[kind])
    return shard_source(root, kind, splits, options, need)


def _split_shards(root: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Group shards by split the way the Hub does (train-00000-of-00002.parquet, test/...)."""
    try:
        from datasets.data_files import DataFilesDict, get_data_patterns

        resolved = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
        wanted = {p.resolve() for p in files}
        splits = {
            str(name): sorted(p for p in (Path(x).resolve() for x in paths) if p in wanted)
            for name, paths in resolved.items()
        }
        splits = {k: v for k, v in splits.items() if v}
        if splits:
            return splits
    except Exception as e:  # split inference is a convenience; fall back to one split
        log.debug("Split inference failed for %s: %s", root, e)
    return {"train": sorted(files)}


def _pick_split(splits: dict[str, list], wanted: str | None, where: str) -> tuple[str, list]:
    if wanted is not None:
        if wanted not in splits:
            raise DataError(f"Split '{wanted}' not found in {where}; splits: "
                            f"{', '.join(sorted(splits))}.")
        return wanted, splits[wanted]
    name = "train" if "train" in splits else sorted(splits)[0]
    return name, splits[name]


def shard_source(root: Path, kind: str, splits: dict[str, list[Path]],
                  options: CalibrationOptions, need: int) -> Source:
    split, files = _pick_split(splits, options.split, f"'{root}'")
    notes = [f"{len(files)} {kind} shard(s) of split '{split}' in '{root}'"]
    if options.split is None and split != "train":
        notes.append(f"no 'train' split; used '{split}'")
    if kind == "parquet":
        src = _parquet_source(files, options)
    else:
        import datasets

        builder = "webdataset" if kind == "webdataset" else "arrow"
        with quiet_datasets(), data_errors(f"Cannot read the {kind} shards in '{root}'"):
            ds = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]},
                                       split=split, streaming=True)
        src = stream_source(ds, options, need, label=kind)
    src.kind, src.resolved, src.split = kind, str(root.resolve()), split
    src.notes[:0] = notes
    return src


def _parquet_source(files: list[Path], options: CalibrationOptions) -> Source:
    """Exact seeded sample over all rows: reads only the row groups it needs, copies nothing."""
    import pyarrow.parquet as pq

    with data_errors("Cannot read parquet metadata"):
        metas = [pq.read_metadata(f) for f in files]
        schema = pq.read_schema(files[0])
    columns = list(schema.names)
    column = options.image_column or column_from_features(_features_of(schema))
    if options.image_column and options.image_column not in columns:
        raise DataError(f"Column '{options.image_column}' not found; columns: "
                        f"{', '.join(columns)}.")
    if column is None:
        with data_errors("Cannot read parquet data"):
            with pq.ParquetFile(files[0]) as pf:
                first = pf.read_row_group(0).slice(0, 1).to_pylist() if pf.num_row_groups else []
        column = column_from_example(first[0]) if first else None
        if column is None:
            raise DataError(f"No image column found in '{files[0].name}'; columns: "
                            f"{', '.join(columns)}. Pass --image-column.")
    groups = [(i, g, md.row_group(g).num_rows) for i, md in enumerate(metas)
              for g in range(md.num_row_groups)]
    starts, total = [], 0
    for *_, rows in groups:
        starts.append(total)
        total += rows

    def candidates() -> Iterator[Candidate]:
        import bisect

        cache: OrderedDict[tuple[int, int], Any] = OrderedDict()  # a few arrow columns
        for index in _seeded_indices(total, options.seed):
            k = bisect.bisect_right(starts, index) - 1
            file_i, group, _ = groups[k]
            if (file_i, group) not in cache:
                with data_errors(f"Cannot read '{files[file_i].name}'"):
                    with pq.ParquetFile(files[file_i]) as pf:
                        table = pf.read_row_group(group, columns=[column])
                cache[(file_i, group)] = table.column(0)
                if len(cache) > 8:
                    cache.popitem(last=False)
            value = cache[(file_i, group)][index - starts[k]].as_py()
            yield Candidate(f"row {index}", value)

    return Source(kind="parquet", resolved="", candidates=candidates(), available=total,
                   image_column=column, notes=[f"{total} rows; image column '{column}'"])


def _features_of(schema: Any) -> Any:
    try:
        import datasets

        return datasets.Features.from_arrow_schema(schema)
    except Exception:
        return None


def saved_source(path: Path, options: CalibrationOptions, need: int) -> Source:
    """A `save_to_disk` folder: memory-mapped, exact seeded sample of row indices."""
    import datasets

    with quiet_datasets(), data_errors(f"Cannot load the saved dataset '{path}'"):
        obj = datasets.load_from_disk(str(path))
    split = None
    if isinstance(obj, datasets.DatasetDict):
        split, obj = _pick_split(dict(obj), options.split, f"'{path}'")
    ds: datasets.Dataset = obj
    columns = list(ds.column_names)
    column = options.image_column or column_from_features(ds.features)
    if options.image_column and options.image_column not in columns:
        raise DataError(f"Column '{options.image_column}' not found; columns: "
                        f"{', '.join(columns)}.")
    raw = ds.select_columns(columns if column is None else [column]).with_format("arrow")
    if column is None and len(ds):
        column = column_from_example(raw[0:1].to_pylist()[0])
    if column is None:
        raise DataError(f"No image column found in '{path}'; columns: {', '.join(columns)}. "
                        "Pass --image-column.")
    total = len(ds)

    def candidates() -> Iterator[Candidate]:
        indices = _seeded_indices(total, options.seed)
        while True:
            chunk = list(itertools.islice(indices, 64))
            if not chunk:
                return
            values = raw[chunk].column(column).to_pylist()
            yield from (Candidate(f"row {i}", v) for i, v in zip(chunk, values, strict=True))

    notes = [f"{total} rows in '{path}'" + (f", split '{split}'" if split else "")
             + f"; image column '{column}'"]
    return Source(kind="saved", resolved=str(path.resolve()), candidates=candidates(),
                   available=total, split=split, image_column=column, notes=notes)


def _seeded_indices(total: int, seed: int) -> Iterator[int]:
    """Distinct indices in [0, total) in a seeded random order; O(k) memory for big totals.

    The order depends only on (total, seed), so asking for more images extends the list.
    """
    rng = random.Random(seed)
    if total <= _FULL_SHUFFLE_MAX:
        order = list(range(total))
        rng.shuffle(order)
        yield from order
        return
    seen: set[int] = set()
    while len(seen) < total:
        i = rng.randrange(total)
        if i not in seen:
            seen.add(i)
            yield i
