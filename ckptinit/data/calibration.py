"""Calibration data: --data -> seeded, preprocessed image tensors (DESIGN 2).

Sources, tried in order: the shipped sample photos (`samples`), an existing local path
(image folder, a folder of parquet/arrow/webdataset shards, a `save_to_disk` folder, or
one such file), else a Hugging Face Hub dataset id, streamed (readers/). Distinct images
are picked by a seeded shuffle; when there are too few, seeded random crops and flips fill
the rest (transforms.py). Decoding and preprocessing run in a thread pool (decode.py; PIL
releases the GIL) and the result does not depend on the number of workers. Library code:
logs, never prints.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._helpers import count, jsonable, one_line
from ..errors import DataError, UsageError
from ..options import CalibrationOptions
from ..output.metadata import data_fields
from .decode import decode, imap_ordered
from .readers import Candidate, Skip, Source, check_source, open_source
from .transforms import Preprocess, resolve_data_config

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


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
    prep = Preprocess(cfg)
    need = options.images + options.holdout
    source = open_source(options, need)
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


def check_data(options: CalibrationOptions) -> None:
    """The failures that need no model and no network, raised before any model is built:
    bad options, a missing folder, a Hub dataset while the Hub is off."""
    _validate(options)
    check_source(options.data)


def _load_one(candidate: Candidate, prep: Preprocess) -> torch.Tensor | Skip:
    try:
        image = decode(candidate.payload, prep.mode)
    except Exception as e:  # a broken image is data, not a bug: skip it and count it
        return Skip(candidate.label, f"{type(e).__name__}: {one_line(e, 200, tidy=False)}")
    return prep.evaluate(image)


def _read_distinct(source: Source, prep: Preprocess, need: int, workers: int,
                   report: ProgressFn) -> tuple[list[tuple[Candidate, torch.Tensor]],
                                                list[Skip], int]:
    """Decode candidates in order until `need` usable images; skips are counted in order."""
    distinct: list[tuple[Candidate, torch.Tensor]] = []
    skipped: list[Skip] = []
    tried = 0
    results = imap_ordered(lambda c: _load_one(c, prep), source.candidates, workers)
    try:
        for candidate, result in results:
            tried += 1
            if isinstance(result, Skip):
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


def _make_crops(pool: list[tuple[Candidate, torch.Tensor]], count: int, prep: Preprocess,
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
        image = decode(pool[index][0].payload, prep.mode)  # decoded fine the first time
        return [prep.crop(image, random.Random(f"ckptinit:{seed}:{stream}:{slot}"))
                for slot in slots]

    out: list[torch.Tensor | None] = [None] * count
    for (_, slots), tensors in imap_ordered(job, sorted(by_source.items()), workers):
        for slot, tensor in zip(slots, tensors, strict=True):
            out[slot] = tensor
        tick(len(slots))
    return [t for t in out if t is not None]


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


def _nothing_usable(source: Source, tried: int, skipped: list[Skip]) -> str:
    where = f"'{source.resolved}'" if source.resolved else "the data"
    if not tried:
        return f"No images found in {where}; pass an image folder, a dataset id, or 'samples'."
    return (f"No usable image in {where}: found {tried}, all {len(skipped)} unreadable, too "
            f"small or too large (e.g. {skipped[0].label}: {skipped[0].reason}); pass another "
            "folder or dataset.")
