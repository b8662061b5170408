"""Calibration data: --data -> seeded, preprocessed image tensors (DESIGN 2).

Sources, tried in order: the shipped sample photos (`samples`), an existing local path
(image folder, a folder of parquet/arrow/webdataset shards, a `save_to_disk` folder, or
one such file), else a Hugging Face Hub dataset id, streamed. Distinct images are picked
by a seeded shuffle; when there are too few, seeded random crops and flips fill the rest.
Decoding and preprocessing run in a thread pool (PIL releases the GIL) and the result
does not depend on the number of workers. Library code: logs, never prints.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import os
import random
import re
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._helpers import count, jsonable, one_line
from ..errors import DataError, UsageError
from ..options import CalibrationOptions
from ..output.metadata import data_fields

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
SHARD_PRIORITY = ("parquet", "arrow", "webdataset")
# Short names people type -> canonical Hub ids (the old un-namespaced ids now redirect or fail).
HUB_ALIASES = {
    "imagenet": "ILSVRC/imagenet-1k",
    "imagenet-1k": "ILSVRC/imagenet-1k",
    "imagenet1k": "ILSVRC/imagenet-1k",
    "cifar10": "uoft-cs/cifar10",
    "cifar-10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "cifar-100": "uoft-cs/cifar100",
    "food101": "ethz/food101",
    "food-101": "ethz/food101",
    "tiny-imagenet": "zh-plus/tiny-imagenet",
    "mini-imagenet": "timm/mini-imagenet",
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "fashion-mnist": "zalando-datasets/fashion_mnist",
    "beans": "AI-Lab-Makerere/beans",
}
SPLIT_FOLDERS = ("train", "training", "val", "valid", "validation", "test", "dev")
CROP_SCALE = (0.35, 1.0)  # area fraction of the random crops that fill in for missing images
CROP_RATIO = (3 / 4, 4 / 3)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_SAVED_MARKERS = (("state.json", "dataset_info.json"), ("dataset_dict.json",))
_FULL_SHUFFLE_MAX = 1 << 20  # up to this many rows a full permutation; above, rejection sampling


@dataclass
class CalibrationInfo:
    """Provenance of the calibration images, for the report and the checkpoint metadata."""

    source: str  # what the user passed to --data
    kind: str  # samples | folder | image | parquet | arrow | webdataset | saved | hub
    resolved: str  # path or Hub id actually used
    num_images: int
    num_holdout: int
    distinct_sources: int  # distinct images read and used
    augmented: int  # images made by random crops and flips (calibration + holdout)
    skipped: int  # undecodable or truncated images skipped
    seed: int
    split: str | None = None
    revision: str | None = None  # the commit sha when the Hub told us, else what was asked
    config: str | None = None
    shuffle_buffer: int | None = None  # only for streamed sources
    image_column: str | None = None
    available: int | None = None  # images/rows found (None when streaming)
    holdout_overlaps: bool = False  # holdout made from crops of calibration images
    transform: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, str]:
        """Flat str->str for the safetensors header (written by output/metadata.py)."""
        return data_fields(self)

    def to_dict(self) -> dict:
        """JSON-able copy (tuples become lists)."""
        return jsonable(asdict(self), fallback=None)


@dataclass
class CalibrationSet:
    """Preprocessed calibration images, held-out images for checks, and their provenance."""

    images: torch.Tensor  # (N, C, H, W) float32 on the CPU
    holdout: torch.Tensor  # (M, C, H, W); distinct from `images` where the data allows
    info: CalibrationInfo

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive slices of `images` (views, no copies); the last one may be short."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, self.images.shape[0], batch_size):
            yield self.images[start : start + batch_size]


# --------------------------------------------------------------------------- public API


def samples_dir() -> Path:
    """Folder of the shipped sample photos: source tree / editable install, else data-files."""
    package = Path(__file__).resolve().parents[1]  # the ckptinit folder
    candidates = [
        package.parent / "samples" / "images",  # repository checkout, `pip install -e`
        package / "samples" / "images",  # if ever shipped as package data
        Path(sys.prefix) / "share" / "ckptinit" / "samples" / "images",  # data-files install
    ]
    for folder in candidates:
        if folder.is_dir():
            return folder
    return candidates[0]


def resolve_data_config(model: nn.Module, options: CalibrationOptions) -> dict:
    """The model's timm eval data config with the user's overrides, validated.

    Returns input_size (C, H, W), interpolation, mean, std, crop_pct, crop_mode. Models
    built for one input channel get a one-channel config (images are then read as grey).
    """
    import timm.data

    cfg = dict(timm.data.resolve_model_data_config(model))
    channels = _input_channels(model) or int(cfg["input_size"][0])
    _, height, width = cfg["input_size"]
    if options.input_size is not None:
        if int(options.input_size) < 1:
            raise UsageError(f"--input-size must be a positive number of pixels, got "
                             f"{options.input_size}.")
        height = width = int(options.input_size)
    cfg["input_size"] = (channels, int(height), int(width))
    for key in ("mean", "std"):
        value = getattr(options, key)
        value = tuple(float(v) for v in (value if value is not None else cfg[key]))
        if len(value) != channels:
            if len(value) == 3 and channels == 1:  # grey model, RGB statistics: average them
                value = (sum(value) / 3,)
            elif len(value) == 1:
                value = value * channels
            else:
                raise UsageError(f"--{key} needs {channels} values for this model, got "
                                 f"{len(value)}.")
        cfg[key] = value
    if any(s <= 0 for s in cfg["std"]):
        raise UsageError(f"--std values must be positive, got {cfg['std']}.")
    if options.crop_pct is not None:
        if not 0 < options.crop_pct <= 1:
            raise UsageError(f"--crop-pct must be in (0, 1], got {options.crop_pct}.")
        cfg["crop_pct"] = float(options.crop_pct)
    if options.interpolation is not None:
        if options.interpolation not in INTERPOLATIONS:
            raise UsageError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}; "
                             f"got '{options.interpolation}'.")
        cfg["interpolation"] = options.interpolation
    elif cfg.get("interpolation") not in INTERPOLATIONS:
        cfg["interpolation"] = "bicubic"  # e.g. 'random' is a training-only choice
    cfg.setdefault("crop_mode", "center")
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: cfg.get(k) for k in keys}


def load_calibration(
    model: nn.Module,
    options: CalibrationOptions,
    progress: ProgressFn | None = None,
) -> CalibrationSet:
    """Read, select and preprocess `options.images` + `options.holdout` images for `model`.

    Same options -> identical tensors, whatever the number of workers. Raises DataError
    (one line) for every expected data failure, UsageError for bad option values.
    """
    _validate(options)
    cfg = resolve_data_config(model, options)
    prep = _Preprocess(cfg)
    need = options.images + options.holdout
    source = _open_source(options, need)
    workers = _worker_count(options, need)
    log.info("Calibration data: %s '%s' (%s), %d images + %d holdout, %d workers",
             source.kind, source.resolved, options.data, options.images, options.holdout,
             workers)
    report = progress or (lambda done, total: None)
    report(0, need)

    distinct, skipped, tried = _read_distinct(source, prep, need, workers, report)
    if not distinct:
        raise DataError(_nothing_usable(source, tried, skipped))

    n_img, n_hold = options.images, options.holdout
    calib = distinct[:n_img]
    hold = distinct[n_img : n_img + n_hold]
    calib_missing, hold_missing = n_img - len(calib), n_hold - len(hold)
    hold_pool = hold or calib
    overlaps = hold_missing > 0 and not hold
    done = len(distinct)

    def tick(k: int) -> None:
        nonlocal done
        done += k
        report(done, need)

    calib_crops = _make_crops(calib, calib_missing, prep, options.seed, "calibration",
                              workers, tick)
    hold_crops = _make_crops(hold_pool, hold_missing, prep, options.seed, "holdout",
                             workers, tick)

    c, h, w = cfg["input_size"]
    images = _stack([t for _, t in calib] + calib_crops, (c, h, w))
    holdout = _stack([t for _, t in hold] + hold_crops, (c, h, w))

    notes = list(source.notes)
    notes += _selection_notes(len(distinct), len(calib), calib_missing, len(hold),
                              hold_missing, overlaps)
    if skipped:
        examples = "; ".join(f"{s.label}: {s.reason}" for s in skipped[:3])
        notes.append(f"{count(len(skipped), 'undecodable image')} skipped (e.g. {examples})")
    info = CalibrationInfo(
        source=options.data,
        kind=source.kind,
        resolved=source.resolved,
        num_images=images.shape[0],
        num_holdout=holdout.shape[0],
        distinct_sources=len(distinct),
        augmented=calib_missing + hold_missing,
        skipped=len(skipped),
        seed=options.seed,
        split=source.split,
        revision=source.revision,
        config=source.config,
        shuffle_buffer=options.shuffle_buffer if source.streaming else None,
        image_column=source.image_column,
        available=source.available,
        holdout_overlaps=overlaps,
        transform=jsonable(cfg, fallback=None),
        notes=notes,
    )
    for note in notes:
        log.info("Calibration data: %s", note)
    return CalibrationSet(images=images, holdout=holdout, info=info)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Candidate:
    """One image to try: `payload` is a path, bytes, a {bytes, path} dict or a PIL image."""

    label: str
    payload: Any


@dataclass
class _Skip:
    label: str
    reason: str


@dataclass
class _Source:
    """Resolved --data: candidates in seeded order, lazily produced, plus provenance."""

    kind: str
    resolved: str
    candidates: Iterable[_Candidate]
    available: int | None = None
    streaming: bool = False
    split: str | None = None
    config: str | None = None
    revision: str | None = None
    image_column: str | None = None
    notes: list[str] = field(default_factory=list)


def _open_source(options: CalibrationOptions, need: int) -> _Source:
    data = options.data
    if data == "samples":
        folder = samples_dir()
        files = _list_images(folder) if folder.is_dir() else []
        if not files:
            raise DataError(f"The sample photos are missing (looked in '{folder}'); reinstall "
                            "ckptinit with `pip install -e .` from its repository, or pass "
                            "--data with an image folder.")
        return _folder_source(folder, files, options, kind="samples")
    path = Path(data).expanduser()
    if path.exists():
        return _local_source(path, options, need)
    if _looks_like_path(data):
        raise DataError(f"Data folder '{data}' does not exist; pass an image folder, a "
                        "dataset id, or 'samples'.")
    return _hub_source(data, options, need)


def check_data(options: CalibrationOptions) -> None:
    """The failures that need no model and no network, raised before any model is built:
    bad options, a missing folder, a Hub dataset while the Hub is off."""
    _validate(options)
    data = options.data
    if data == "samples" or Path(data).expanduser().exists():
        return
    if _looks_like_path(data):
        raise DataError(f"Data folder '{data}' does not exist; pass an image folder, a "
                        "dataset id, or 'samples'.")
    if _hub_offline():
        repo_id = HUB_ALIASES.get(data.lower(), data)
        raise _offline_error(repo_id)


def _offline_error(repo_id: str) -> DataError:
    return DataError(f"Cannot stream dataset '{repo_id}': Hugging Face Hub offline mode is on "
                     "(HF_HUB_OFFLINE=1); pass a local image or dataset folder, or 'samples'.")


def _looks_like_path(data: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else that names a file system path is one."""
    if data.startswith((".", "~", "/", "\\")) or "\\" in data or re.match(r"^[A-Za-z]:", data):
        return True
    if data.count("/") >= 2:
        return True
    return data.lower().endswith(IMAGE_EXTENSIONS + tuple(SHARD_KINDS) + (".zip",))


def _local_source(path: Path, options: CalibrationOptions, need: int) -> _Source:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            return _folder_source(path.parent, [path.name], options, kind="image", resolved=path)
        if suffix in SHARD_KINDS:
            return _shard_source(path, SHARD_KINDS[suffix], {"train": [path]}, options, need)
        raise DataError(f"'{path}' is neither an image nor a dataset shard "
                        "(.parquet/.arrow/.tar); pass an image folder, a dataset id, or "
                        "'samples'.")
    if not path.is_dir():
        raise DataError(f"'{path}' is not a file or folder that can be read; pass an image "
                        "folder, a dataset id, or 'samples'.")
    if any(all((path / m).is_file() for m in markers) for markers in _SAVED_MARKERS):
        return _saved_source(path, options, need)
    files = _walk(path)
    by_kind: dict[str, list[Path]] = {}
    for rel in files:
        kind = SHARD_KINDS.get(_suffix(rel))
        if kind:
            by_kind.setdefault(kind, []).append(path / rel)
    if by_kind:
        kind = next(k for k in SHARD_PRIORITY if k in by_kind)
        splits = _split_shards(path, by_kind[kind])
        return _shard_source(path, kind, splits, options, need)
    images = [rel for rel in files if _suffix(rel) in IMAGE_EXTENSIONS]
    images, resolved, notes = _image_split(path, images, options.split)
    if not images:
        raise DataError(f"No image files in folder '{resolved}' (looked for "
                        f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} and dataset shards "
                        f"among {len(files)} files); pass an image folder, a dataset id, or "
                        "'samples'.")
    src = _folder_source(path, images, options, kind="folder", resolved=resolved)
    src.notes[:0] = notes
    return src


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > name.rfind("/") else ""


def _walk(root: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden files under root, sorted; symlinked folders are
    followed once. Plain strings: an ImageNet-sized folder is 1.3M entries."""
    out: list[str] = []
    seen: set[str] = set()

    def onerror(err: OSError) -> None:
        log.warning("Cannot list %s: %s", err.filename, err.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # stable link choice
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out.extend(prefix + f for f in filenames if not f.startswith("."))
    out.sort()
    return out


def _list_images(folder: Path) -> list[str]:
    return [rel for rel in _walk(folder) if _suffix(rel) in IMAGE_EXTENSIONS]


def _image_split(root: Path, images: list[str], split: str | None
                 ) -> tuple[list[str], Path, list[str]]:
    """--split on an image folder picks a sub-folder of that name (train/, val/, ...)."""
    if split is None:
        return images, root, []
    if (root / split).is_dir():
        prefix = split.strip("/") + "/"
        return ([rel for rel in images if rel.startswith(prefix)], root / split,
                [f"split '{split}': sub-folder '{prefix}'"])
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in SPLIT_FOLDERS)
    if present:
        raise DataError(f"Folder '{root}' has no '{split}' sub-folder; splits found: "
                        f"{', '.join(present)}.")
    log.warning("--split '%s' ignored: folder '%s' has no split sub-folders", split, root)
    return images, root, [f"--split '{split}' ignored: the folder has no split sub-folders"]


def _folder_source(root: Path, files: list[str], options: CalibrationOptions, kind: str,
                   resolved: Path | None = None) -> _Source:
    """Files (relative to root) in a seeded order; candidates are made lazily."""
    order = list(files)
    random.Random(options.seed).shuffle(order)
    notes = ([f"{len(files)} sample photos shipped with ckptinit"] if kind == "samples"
             else [f"{len(files)} image files in '{resolved or root}'"])
    return _Source(kind=kind, resolved=str((resolved or root).resolve()),
                   candidates=(_Candidate(rel, root / rel) for rel in order),
                   available=len(files), notes=notes)


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


def _shard_source(root: Path, kind: str, splits: dict[str, list[Path]],
                  options: CalibrationOptions, need: int) -> _Source:
    split, files = _pick_split(splits, options.split, f"'{root}'")
    notes = [f"{len(files)} {kind} shard(s) of split '{split}' in '{root}'"]
    if options.split is None and split != "train":
        notes.append(f"no 'train' split; used '{split}'")
    if kind == "parquet":
        src = _parquet_source(files, options)
    else:
        import datasets

        builder = "webdataset" if kind == "webdataset" else "arrow"
        with _quiet_datasets(), _data_errors(f"Cannot read the {kind} shards in '{root}'"):
            ds = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]},
                                       split=split, streaming=True)
        src = _stream_source(ds, options, need, label=kind)
    src.kind, src.resolved, src.split = kind, str(root.resolve()), split
    src.notes[:0] = notes
    return src


def _parquet_source(files: list[Path], options: CalibrationOptions) -> _Source:
    """Exact seeded sample over all rows: reads only the row groups it needs, copies nothing."""
    import pyarrow.parquet as pq

    with _data_errors("Cannot read parquet metadata"):
        metas = [pq.read_metadata(f) for f in files]
        schema = pq.read_schema(files[0])
    columns = list(schema.names)
    column = options.image_column or _column_from_features(_features_of(schema))
    if options.image_column and options.image_column not in columns:
        raise DataError(f"Column '{options.image_column}' not found; columns: "
                        f"{', '.join(columns)}.")
    if column is None:
        with _data_errors("Cannot read parquet data"):
            with pq.ParquetFile(files[0]) as pf:
                first = pf.read_row_group(0).slice(0, 1).to_pylist() if pf.num_row_groups else []
        column = _column_from_example(first[0]) if first else None
        if column is None:
            raise DataError(f"No image column found in '{files[0].name}'; columns: "
                            f"{', '.join(columns)}. Pass --image-column.")
    groups = [(i, g, md.row_group(g).num_rows) for i, md in enumerate(metas)
              for g in range(md.num_row_groups)]
    starts, total = [], 0
    for *_, rows in groups:
        starts.append(total)
        total += rows

    def candidates() -> Iterator[_Candidate]:
        import bisect

        cache: OrderedDict[tuple[int, int], Any] = OrderedDict()  # a few arrow columns
        for index in _seeded_indices(total, options.seed):
            k = bisect.bisect_right(starts, index) - 1
            file_i, group, _ = groups[k]
            if (file_i, group) not in cache:
                with _data_errors(f"Cannot read '{files[file_i].name}'"):
                    with pq.ParquetFile(files[file_i]) as pf:
                        table = pf.read_row_group(group, columns=[column])
                cache[(file_i, group)] = table.column(0)
                if len(cache) > 8:
                    cache.popitem(last=False)
            value = cache[(file_i, group)][index - starts[k]].as_py()
            yield _Candidate(f"row {index}", value)

    return _Source(kind="parquet", resolved="", candidates=candidates(), available=total,
                   image_column=column, notes=[f"{total} rows; image column '{column}'"])


def _features_of(schema: Any) -> Any:
    try:
        import datasets

        return datasets.Features.from_arrow_schema(schema)
    except Exception:
        return None


def _saved_source(path: Path, options: CalibrationOptions, need: int) -> _Source:
    """A `save_to_disk` folder: memory-mapped, exact seeded sample of row indices."""
    import datasets

    with _quiet_datasets(), _data_errors(f"Cannot load the saved dataset '{path}'"):
        obj = datasets.load_from_disk(str(path))
    split = None
    if isinstance(obj, datasets.DatasetDict):
        split, obj = _pick_split(dict(obj), options.split, f"'{path}'")
    ds: datasets.Dataset = obj
    columns = list(ds.column_names)
    column = options.image_column or _column_from_features(ds.features)
    if options.image_column and options.image_column not in columns:
        raise DataError(f"Column '{options.image_column}' not found; columns: "
                        f"{', '.join(columns)}.")
    raw = ds.select_columns(columns if column is None else [column]).with_format("arrow")
    if column is None and len(ds):
        column = _column_from_example(raw[0:1].to_pylist()[0])
    if column is None:
        raise DataError(f"No image column found in '{path}'; columns: {', '.join(columns)}. "
                        "Pass --image-column.")
    total = len(ds)

    def candidates() -> Iterator[_Candidate]:
        indices = _seeded_indices(total, options.seed)
        while True:
            chunk = list(itertools.islice(indices, 64))
            if not chunk:
                return
            values = raw[chunk].column(column).to_pylist()
            yield from (_Candidate(f"row {i}", v) for i, v in zip(chunk, values, strict=True))

    notes = [f"{total} rows in '{path}'" + (f", split '{split}'" if split else "")
             + f"; image column '{column}'"]
    return _Source(kind="saved", resolved=str(path.resolve()), candidates=candidates(),
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


# --------------------------------------------------------------------------- streaming / Hub


def _hub_source(data: str, options: CalibrationOptions, need: int) -> _Source:
    repo_id = HUB_ALIASES.get(data.lower(), data)
    notes = []
    if repo_id != data:
        log.info("Dataset '%s' is the Hub dataset '%s'", data, repo_id)
        notes.append(f"'{data}' is the Hub dataset '{repo_id}'")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception:
        raise DataError(f"'{data}' is neither an existing path nor a valid dataset id; pass "
                        "an image folder, a dataset id, or 'samples'.") from None
    if _hub_offline():
        raise _offline_error(repo_id)
    token = options.token or None
    sha = _hub_revision(repo_id, options.revision, token)
    revision = sha or options.revision
    split = options.split or "train"
    import datasets

    log.info("Streaming %s (split %s, revision %s)", repo_id, split, revision or "main")
    with _quiet_datasets(), _hub_errors(repo_id, split):
        ds = datasets.load_dataset(repo_id, name=options.config, split=split, streaming=True,
                                   revision=revision, token=token)
    src = _stream_source(ds, options, need, label=repo_id)
    src.kind, src.resolved, src.split = "hub", repo_id, split
    src.config, src.revision = options.config, revision
    src.notes[:0] = notes
    return src


def _hub_offline() -> bool:
    """Offline mode from the environment or from already-imported hub/datasets settings."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    ds_mod = sys.modules.get("datasets")
    return bool(getattr(getattr(ds_mod, "config", None), "HF_HUB_OFFLINE", False))


def _hub_revision(repo_id: str, revision: str | None, token: str | None) -> str | None:
    """Fast pre-flight: fails in seconds (no network, unknown id, gated) and pins the sha."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub import errors as hf_errors

    from .. import __version__

    try:
        info = HfApi(library_name="ckptinit", library_version=__version__).dataset_info(
            repo_id, revision=revision, token=token, timeout=10)
    except hf_errors.GatedRepoError:
        raise DataError(_gated_message(repo_id)) from None
    except hf_errors.RevisionNotFoundError:
        raise DataError(f"Revision '{revision}' not found for dataset '{repo_id}'; pass a "
                        "branch, tag or commit that exists.") from None
    except hf_errors.RepositoryNotFoundError:
        raise DataError(_not_found_message(repo_id)) from None
    except hf_errors.HfHubHTTPError as e:
        raise DataError(f"The Hub refused dataset '{repo_id}': "
                        f"{one_line(e, 200, tidy=False)}") from None
    except Exception as e:
        raise DataError(_network_message(repo_id, e)) from None
    if getattr(info, "gated", False) and not (token or get_token()):
        raise DataError(_gated_message(repo_id))
    return getattr(info, "sha", None)


def _gated_message(repo_id: str) -> str:
    return (f"Dataset '{repo_id}' is gated: request access on "
            f"https://huggingface.co/datasets/{repo_id}, then run `hf auth login` or pass "
            "--token.")


def _not_found_message(repo_id: str) -> str:
    return (f"Dataset '{repo_id}' was not found on the Hugging Face Hub (check the id; pass "
            "--token for a private one), nor as a local path; or pass 'samples'.")


def _network_message(repo_id: str, e: BaseException) -> str:
    return (f"Cannot reach the Hugging Face Hub to stream '{repo_id}' ({type(e).__name__}: "
            f"{one_line(e, 200, tidy=False)}); check the connection, or pass a local folder "
            "or 'samples'.")


@contextlib.contextmanager
def _hub_errors(repo_id: str, split: str) -> Iterator[None]:
    """Map what `datasets.load_dataset` raises for a Hub id to one-line DataErrors."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        name = type(e).__name__
        text = str(e)
        if name == "DatasetNotFoundError":
            if "gated" in text.replace(repo_id, "").lower():
                raise DataError(_gated_message(repo_id)) from None
            raise DataError(_not_found_message(repo_id)) from None
        if isinstance(e, ValueError):
            found = re.search(r"Available splits: (\[.*?\])", text)
            if found or "split" in text.lower():
                listed = (f"; splits: {found.group(1)}" if found
                          else f" ({one_line(e, 200, tidy=False)})")
                raise DataError(f"Split '{split}' not found in dataset '{repo_id}'{listed}. "
                                "Pass --split.") from None
            configs = re.search(r"available configs: (\[.*?\])", text, re.IGNORECASE)
            if configs:
                raise DataError(f"Dataset '{repo_id}' has several configs; pass --config, one "
                                f"of {configs.group(1)}.") from None
            raise DataError(f"Cannot open dataset '{repo_id}': "
                            f"{one_line(e, 200, tidy=False)}") from None
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or "http" in name.lower() \
                or "connect" in name.lower() or "timeout" in name.lower():
            raise DataError(_network_message(repo_id, e)) from None
        raise DataError(f"Cannot open dataset '{repo_id}': {name}: "
                        f"{one_line(e, 200, tidy=False)}") from None


def _stream_source(ds: Any, options: CalibrationOptions, need: int, label: str) -> _Source:
    """A streamed dataset: pick the image column, shuffle(seed, buffer) THEN take(need)."""
    features = getattr(ds, "features", None)
    columns = list(features) if features else list(getattr(ds, "column_names", None) or [])
    column = options.image_column or _column_from_features(features)
    if options.image_column and columns and options.image_column not in columns:
        raise DataError(f"Column '{options.image_column}' not found in '{label}'; columns: "
                        f"{', '.join(columns)}.")
    if column is not None and columns:
        ds = ds.select_columns([column])
    if hasattr(ds, "decode"):
        ds = ds.decode(False)  # raw bytes: decoding happens in our thread pool
    ds = ds.shuffle(seed=options.seed, buffer_size=options.shuffle_buffer)
    ds = ds.take(need)  # after shuffle: take() first would freeze the shard order
    src = _Source(kind="hub", resolved=label, candidates=(), streaming=True,
                  image_column=column)

    def candidates() -> Iterator[_Candidate]:
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
                src.image_column = _column_from_example(example)
                if src.image_column is None:
                    raise DataError(f"No image column found in '{label}'; columns: "
                                    f"{', '.join(example)}. Pass --image-column.")
            yield _Candidate(f"example {count}", example.get(src.image_column))
            count += 1

    src.candidates = candidates()
    return src


def _column_from_features(features: Any) -> str | None:
    """The first `datasets.Image` column, preferring the usual names."""
    if not features:
        return None
    try:
        from datasets import Image as ImageFeature
    except Exception:
        return None
    found = [name for name, feat in features.items() if isinstance(feat, ImageFeature)]
    for preferred in ("image", "img", "jpg", "jpeg", "png", "webp"):
        if preferred in found:
            return preferred
    return found[0] if found else None


def _column_from_example(example: dict) -> str | None:
    """Guess the image column from values: a PIL image, {bytes, path}, or image bytes."""
    from PIL import Image

    fallback = None
    for name, value in example.items():
        if isinstance(value, Image.Image):
            return name
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            if value.get("bytes") or str(value.get("path", "")).lower().endswith(
                    IMAGE_EXTENSIONS):
                return name
        if fallback is None and isinstance(value, (bytes, bytearray)) and _is_image_bytes(value):
            fallback = name
    return fallback


def _is_image_bytes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:
        return False


# --------------------------------------------------------------------------- decoding


class _Preprocess:
    """The model's eval transform, plus seeded random crops for filling in missing images."""

    def __init__(self, cfg: dict) -> None:
        import timm.data
        from PIL import Image

        self.eval_transform = timm.data.create_transform(**cfg, is_training=False)
        channels, height, width = cfg["input_size"]
        if channels not in (1, 3):
            raise UsageError(f"The model takes {channels} input channels; calibration images "
                             "can only be read as RGB (3) or grey (1).")
        self.mode = "L" if channels == 1 else "RGB"
        self.size = (width, height)
        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                    "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
        self.resample = resample[cfg["interpolation"]]
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(-1, 1, 1)

    def evaluate(self, image: Any) -> torch.Tensor:
        return self.eval_transform(image).to(torch.float32).contiguous()

    def crop(self, image: Any, rng: random.Random) -> torch.Tensor:
        """RandomResizedCrop(scale=CROP_SCALE) + horizontal flip, drawn from `rng` only."""
        import numpy as np
        from PIL import Image

        box = _crop_box(image.size, rng)
        out = image.resize(self.size, self.resample, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(out, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1))
        return ((tensor.permute(2, 0, 1) - self.mean) / self.std).contiguous()


def _crop_box(size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
    width, height = size
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, width - w)
            y = rng.randint(0, height - h)
            return (x, y, x + w, y + h)
    side = min(width, height)  # fallback: centre square
    x, y = (width - side) // 2, (height - side) // 2
    return (x, y, x + side, y + side)


def _decode(payload: Any, mode: str) -> Any:
    """Any supported payload -> a PIL image in `mode` ('RGB' or 'L'). Raises on bad data."""
    from PIL import Image, ImageOps

    if payload is None:
        raise ValueError("no image in this row")
    if isinstance(payload, Image.Image):
        return _to_mode(payload, mode)
    if isinstance(payload, dict):
        data, path = payload.get("bytes"), payload.get("path")
        if data:
            payload = data
        elif path:
            payload = Path(path)
        else:
            raise ValueError("empty image value")
    source = io.BytesIO(payload) if isinstance(payload, (bytes, bytearray, memoryview)) \
        else payload
    with Image.open(source) as image:
        image.load()  # truncated or corrupt files fail here, not later in a transform
        image = ImageOps.exif_transpose(image) or image
        return _to_mode(image, mode)


def _to_mode(image: Any, mode: str) -> Any:
    """Grey, 16-bit, palette, CMYK, alpha -> RGB (or L); transparency composited on white."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = float(array.max()) if array.size else 0.0
        scale = 255.0 / top if top > 255.0 else (255.0 if 0 < top <= 1.0 else 1.0)
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def _load_one(candidate: _Candidate, prep: _Preprocess) -> torch.Tensor | _Skip:
    try:
        image = _decode(candidate.payload, prep.mode)
    except Exception as e:  # a broken image is data, not a bug: skip it and count it
        return _Skip(candidate.label, f"{type(e).__name__}: {one_line(e, 200, tidy=False)}")
    return prep.evaluate(image)


def _read_distinct(source: _Source, prep: _Preprocess, need: int, workers: int,
                   report: ProgressFn) -> tuple[list[tuple[_Candidate, torch.Tensor]],
                                                list[_Skip], int]:
    """Decode candidates in order until `need` usable images; skips are counted in order."""
    distinct: list[tuple[_Candidate, torch.Tensor]] = []
    skipped: list[_Skip] = []
    tried = 0
    results = _imap_ordered(lambda c: _load_one(c, prep), source.candidates, workers)
    try:
        for candidate, result in results:
            tried += 1
            if isinstance(result, _Skip):
                skipped.append(result)
                level = logging.WARNING if len(skipped) <= 5 else logging.DEBUG
                log.log(level, "Skipped undecodable image %s (%s)", result.label, result.reason)
                continue
            distinct.append((candidate, result))
            report(len(distinct), need)
            if len(distinct) == need:
                break
    finally:
        results.close()
    return distinct, skipped, tried


def _make_crops(pool: list[tuple[_Candidate, torch.Tensor]], count: int, prep: _Preprocess,
                seed: int, stream: str, workers: int, tick: Callable[[int], None]
                ) -> list[torch.Tensor]:
    """`count` seeded crops, slot j from pool[j % len(pool)]; one decode per source image."""
    if count <= 0:
        return []
    by_source: dict[int, list[int]] = {}
    for slot in range(count):
        by_source.setdefault(slot % len(pool), []).append(slot)

    def job(item: tuple[int, list[int]]) -> list[torch.Tensor]:
        index, slots = item
        image = _decode(pool[index][0].payload, prep.mode)  # decoded fine the first time
        return [prep.crop(image, random.Random(f"ckptinit:{seed}:{stream}:{slot}"))
                for slot in slots]

    out: list[torch.Tensor | None] = [None] * count
    for (_, slots), tensors in _imap_ordered(job, sorted(by_source.items()), workers):
        for slot, tensor in zip(slots, tensors, strict=True):
            out[slot] = tensor
        tick(len(slots))
    return [t for t in out if t is not None]


def _imap_ordered(fn: Callable[[Any], Any], items: Iterable[Any], workers: int
                  ) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) in input order, at most 2*workers in flight; items read lazily here."""
    iterator = iter(items)
    if workers <= 1:
        for item in iterator:
            yield item, fn(item)
        return
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptinit-data")
    pending: deque = deque()
    try:
        for item in iterator:
            pending.append((item, executor.submit(fn, item)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, future = pending.popleft()
            result = future.result()
            for nxt in iterator:
                pending.append((nxt, executor.submit(fn, nxt)))
                break
            yield item, result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- helpers


def _validate(options: CalibrationOptions) -> None:
    if not options.data:
        raise UsageError("--data is empty; pass an image folder, a dataset id, or 'samples'.")
    if options.images < 1:
        raise UsageError(f"--images must be at least 1, got {options.images}.")
    if options.holdout < 0:
        raise UsageError(f"--holdout must be 0 or more, got {options.holdout}.")
    if options.shuffle_buffer < 1:
        raise UsageError(f"--shuffle-buffer must be at least 1, got {options.shuffle_buffer}.")
    if options.workers is not None and options.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {options.workers}.")


def _worker_count(options: CalibrationOptions, need: int) -> int:
    workers = options.workers if options.workers is not None else min(8, os.cpu_count() or 1)
    return max(0, min(workers, need))


def _input_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first conv (timm's pretrained_cfg names it)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    module = None
    if name:
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(name)
    if module is None:
        module = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)),
                      None)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    return int(weight.shape[1] * getattr(module, "groups", 1))


def _stack(tensors: list[torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
    if not tensors:
        return torch.empty((0, *shape), dtype=torch.float32)
    return torch.stack(tensors).contiguous()


def _selection_notes(distinct: int, calib: int, calib_missing: int, hold: int,
                     hold_missing: int, overlaps: bool) -> list[str]:
    notes = [f"{count(distinct, 'distinct image')} read"]
    if calib_missing:
        notes.append(f"{count(calib, 'distinct calibration image')}; {calib_missing} more made "
                     "by random crops and flips of them")
    if hold and not hold_missing:
        notes.append(f"{count(hold, 'holdout image')}, none used for fitting")
    elif hold_missing and hold:
        notes.append(f"{count(hold, 'distinct holdout image')} not used for fitting; "
                     f"{hold_missing} more made by random crops and flips of them")
    elif hold_missing and overlaps:
        notes.append(f"too few distinct images for a separate holdout: its "
                     f"{count(hold_missing, 'image')} are random crops (another seed stream) "
                     "of the calibration images")
    return notes


def _nothing_usable(source: _Source, tried: int, skipped: list[_Skip]) -> str:
    where = f"'{source.resolved}'" if source.resolved else "the data"
    if not tried:
        return f"No images found in {where}; pass an image folder, a dataset id, or 'samples'."
    return (f"No readable image in {where}: found {tried}, all {len(skipped)} undecodable "
            f"(e.g. {skipped[0].label}: {skipped[0].reason}); pass another folder or dataset.")


@contextlib.contextmanager
def _data_errors(what: str) -> Iterator[None]:
    """Turn unexpected reader failures of local datasets into one-line DataErrors."""
    try:
        yield
    except (DataError, UsageError):
        raise
    except Exception as e:
        raise DataError(f"{what}: {type(e).__name__}: {one_line(e, 200, tidy=False)}") from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No tqdm bars from `datasets` inside the library; restores the previous setting."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
