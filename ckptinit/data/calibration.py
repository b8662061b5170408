"""Calibration data: --data -> seeded, preprocessed images, streamed (DESIGN 2).

Sources, tried in order: the shipped sample photos (`samples`), an existing local path
(image folder, a folder of parquet/arrow/webdataset shards, a `save_to_disk` folder, or
one such file), else a Hugging Face Hub dataset id, streamed (readers/). Distinct images
are picked by a seeded shuffle; when there are too few, seeded random crops and flips fill
the rest (transforms.py). Decoding and preprocessing run in a thread pool (read.py,
decode.py; PIL releases the GIL; under torchrun each rank decodes only its share),
straight into an on-disk spool (spool.py) that the method's passes read
back as batches (batches.py), so memory stays flat in --images; the result does not
depend on the number of workers. Library code: logs, never prints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .._helpers import count, jsonable
from ..errors import DataError, UsageError
from ..options import CalibrationOptions
from ..output.metadata import data_fields
from .batches import SpoolBatches
from .decode import decode, imap_ordered
from .read import Share, read_distinct, read_sharded
from .readers import Candidate, Skip, Source, check_source, open_source
from .spool import ImageSpool
from .transforms import PixelNormalizer, Preprocess, resolve_data_config

log = logging.getLogger(__name__)

# fewer distinct calibration images than this get a warning: fitted on 7-21 distinct images,
# ViT's and ConvNeXt's change rates spread 2-4.8x on photos the step never saw, on 39 about
# 1.2-1.6x (benchmarks/README.md, "How many distinct images"); crops do not replace them
MIN_DISTINCT = 32

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
    """Preprocessed calibration images (on disk, in a spool), held-out images for checks
    (in memory: a small fixed count), and their provenance. Close it when done."""

    spool: ImageSpool  # the N calibration images as records, in their seeded order
    normalizer: PixelNormalizer  # uint8 records -> the float32 images the model reads
    holdout: torch.Tensor  # (M, C, H, W) float32 on the CPU; distinct from the images where
    info: CalibrationInfo  # the data allows
    common: int | None = None  # under torchrun: the leading records every rank holds
    labels: bytes = b""  # under torchrun: a digest of every image's label and size, in order

    @property
    def num_images(self) -> int:
        return self.spool.count

    @property
    def images(self) -> torch.Tensor:
        """All calibration images as one (N, C, H, W) float32 CPU tensor. Memory grows with
        N: for small sets and tests; the pipeline streams `batches()` instead. Under a
        `Share` a rank lacks the other ranks' images: this raises ValueError there."""
        records = self.spool.read(0, self.spool.count)
        x = torch.from_numpy(records)
        return self.normalizer(x) if x.dtype == torch.uint8 else x

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> SpoolBatches:
        """The images as a re-iterable stream of batches on `device` (the last may be short)."""
        return SpoolBatches(self.spool, batch_size, device, self.normalizer)

    def fingerprint(self) -> bytes:
        """A digest of the pixels every rank holds (all images, or under a `Share` the first
        ones and the holdout) and of every image's label and size, in order: processes of
        one run compare it to know that they read the same images."""
        digest = hashlib.blake2b(self.labels, digest_size=32)
        held = self.spool.count if self.common is None else self.common
        for start in range(0, held, 64):
            digest.update(self.spool.read(start, min(start + 64, held)).tobytes())
        digest.update(self.holdout.numpy().tobytes())
        return digest.digest()

    def close(self) -> None:
        """Release the spool (its temporary file); `info` and `holdout` stay usable."""
        self.spool.close()

    def __enter__(self) -> CalibrationSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_calibration(
    model: nn.Module,
    options: CalibrationOptions,
    progress: ProgressFn | None = None,
    share: Share | None = None,
) -> CalibrationSet:
    """Read, select and preprocess `options.images` + `options.holdout` images for `model`.

    Decoding runs in a thread pool and streams into the spool: memory does not grow with
    `options.images`. Same options -> identical images, whatever the number of workers.
    With a `share` (under torchrun; every rank calls it together) this rank decodes and
    spools only the images the share holds, at the indices one process gives them; its
    batches outside the share cannot be read. Raises DataError (one line) for every
    expected data failure, UsageError for bad option values.
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
    spool = ImageSpool(options.images, prep.record_shape, prep.record_dtype)
    try:
        return _fill(spool, source, prep, cfg, options, workers, report, share)
    except BaseException:
        spool.close()
        raise


def _fill(spool: ImageSpool, source: Source, prep: Preprocess, cfg: dict,
          options: CalibrationOptions, workers: int, report: ProgressFn,
          share: Share | None) -> CalibrationSet:
    n_img, n_hold = options.images, options.holdout
    need = n_img + n_hold
    hold_records: list[np.ndarray] = []

    def put(index: int, record: np.ndarray) -> None:
        if index < n_img:
            spool.write(index, record)
        else:
            hold_records.append(record)

    if share is None:
        read = read_distinct(source, prep, need, workers, report, put, keep_heavy=n_img)
    else:
        read = read_sharded(source, prep, need, share, workers, report, put, keep_heavy=n_img)
        log.info("Calibration data: this rank decoded %d of the %d images read (the images of "
                 "its batches, the first %d and the holdout)", read.decoded, read.tried,
                 read.common)
    holds = share.holds if share is not None else (lambda index: True)
    if not read.distinct:
        raise DataError(_nothing_usable(source, read.tried, read.skipped))
    distinct = len(read.distinct)
    calib = read.distinct[:n_img]
    hold = read.distinct[n_img : n_img + n_hold]
    calib_missing, hold_missing = n_img - len(calib), n_hold - len(hold)
    overlaps = hold_missing > 0 and not hold
    crops_of_calib = calib_missing > 0 or (hold_missing > 0 and not hold)
    if crops_of_calib and any(c.payload is None for c in calib):
        calib = _refetch(options, need, calib)
    hold_pool = hold or calib
    done = distinct

    def tick(k: int) -> None:
        nonlocal done
        done += k
        report(done, need)

    slots = [s for s in range(max(0, calib_missing)) if holds(len(calib) + s)]
    _make_crops(calib, slots, prep, options.seed, "calibration", workers, tick,
                lambda slot, record: spool.write(len(calib) + slot, record))
    hold_crops: list[np.ndarray | None] = [None] * max(0, hold_missing)
    _make_crops(hold_pool, range(max(0, hold_missing)), prep, options.seed, "holdout",
                workers, tick, hold_crops.__setitem__)
    records = hold_records + [r for r in hold_crops if r is not None]
    holdout = (prep.to_tensor(np.stack(records)) if records
               else torch.empty((0, *prep.record_shape), dtype=torch.float32))

    notes = list(source.notes)
    notes += _selection_notes(distinct, len(calib), calib_missing, len(hold),
                              hold_missing, overlaps)
    if len(calib) < MIN_DISTINCT:
        msg = (f"only {count(len(calib), 'distinct calibration image')}"
               + (f" ({calib_missing} more are crops of them)" if calib_missing > 0 else "")
               + ": statistics and change rates fitted on so few carry over to other images "
               "only roughly (most for attention, squeeze-excite and ConvNeXt nets); for a "
               f"checkpoint you will train, pass --data with {MIN_DISTINCT} or more distinct "
               "images like the ones it will see")
        log.warning(msg[0].upper() + msg[1:] + ".")
        notes.append(msg)
    if read.skipped:
        examples = "; ".join(f"{s.label}: {s.reason}" for s in read.skipped[:3])
        notes.append(f"{count(len(read.skipped), 'undecodable image')} skipped "
                     f"(e.g. {examples})")
    info = CalibrationInfo(
        source=options.data,
        kind=source.kind,
        resolved=source.resolved,
        num_images=spool.count,
        num_holdout=holdout.shape[0],
        distinct_sources=distinct,
        augmented=calib_missing + hold_missing,
        skipped=len(read.skipped),
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
    return CalibrationSet(spool=spool, normalizer=prep.normalizer, holdout=holdout, info=info,
                          common=read.common, labels=read.labels)


def check_data(options: CalibrationOptions) -> None:
    """The failures that need no model and no network, raised before any model is built:
    bad options, a missing folder, a Hub dataset while the Hub is off."""
    _validate(options)
    check_source(options.data)


def _refetch(options: CalibrationOptions, need: int, kept: list[Candidate]) -> list[Candidate]:
    """The dropped payloads of `kept`, read again from a fresh, identically seeded source
    (only when too few images exist and crops must be made of them)."""
    wanted = {c.label for c in kept if c.payload is None}
    found: dict[str, Candidate] = {}
    for candidate in open_source(options, need).candidates:
        if candidate.label in wanted:
            found[candidate.label] = candidate
            if len(found) == len(wanted):
                break
    if len(found) < len(wanted):
        raise DataError("The calibration data changed while it was read (images seen the "
                        "first time are gone); run again.")
    return [found.get(c.label, c) if c.payload is None else c for c in kept]


def _make_crops(pool: list[Candidate], slots: Iterable[int], prep: Preprocess, seed: int,
                stream: str, workers: int, tick: Callable[[int], None],
                put: Callable[[int, np.ndarray], None]) -> None:
    """The seeded crops of `slots`, slot j from pool[j % len(pool)], each handed to `put` as
    it is made (in the workers); one decode per source image."""
    by_source: dict[int, list[int]] = {}
    for slot in slots:
        by_source.setdefault(slot % len(pool), []).append(slot)

    def job(item: tuple[int, list[int]]) -> int:
        index, slots = item
        image = decode(pool[index].payload, prep.mode)  # decoded fine the first time
        for slot in slots:
            put(slot, prep.crop_record(image, random.Random(f"ckptinit:{seed}:{stream}:{slot}")))
        return len(slots)

    for _, made in imap_ordered(job, sorted(by_source.items()), workers):
        tick(made)


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
