"""Candidates -> the usable images, in order: each one decoded and preprocessed into a
record handed to `put(index, record)`, undecodable ones skipped and counted.

Alone (`read_distinct`), a process decodes every candidate until it has `need` images.
Under torchrun (`read_sharded`) a rank decodes only the images it will use (`Share`: the
images of its batches, the method's first images and the hold-out), so decoding and spool
space per rank fall to about 1/N. The index of an image is its position among the usable
candidates, and skips shift it, so the ranks agree on the skips window by window: each
rank decodes the positions of the window whose index it would hold if the window had no
skip, the ranks sum who decoded and who skipped each position (one all-reduce), and every
rank then knows the index of every usable candidate; the few images that a skip moved onto
a rank that did not decode them are decoded there (a window is N batches: a skip moves at
most one image per batch boundary after it, so it costs at most N more decodes). Every
rank thus ends with the candidates, skips and indices of one process, and its batch b
holds exactly one process's batch b.

Streamed datasets (Hub ids, arrow and webdataset shards) are split the same way, by
position in the one seeded stream that every rank iterates, not by
`datasets.distributed.split_dataset_by_node`: that gives each rank its own shards
(`strategy="shards"`, chosen whenever the shard count divides the world size) behind its
own shuffle buffer, or every N-th example of the stream (`"examples"`), neither of which
is one process's order of images into batches once skips are counted. Each rank still
downloads the whole stream (the bytes of one window at a time); it decodes its share.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._helpers import one_line
from ..errors import DataError
from .decode import decode, imap_ordered
from .readers import Candidate, Skip, Source
from .transforms import Preprocess

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PutFn = Callable[[int, np.ndarray], None]
_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f...>"


@dataclass(frozen=True)
class Share:
    """The images one rank holds: the calibration images of `batches` (batches of
    `batch_size`), the first `prefix` ones (the method's sample, on every rank) and every
    hold-out image (index `images` and above: the function check runs on all of them on
    every rank). `window` candidates are read between two agreements on the skips."""

    batch_size: int
    batches: frozenset[int]
    prefix: int
    images: int
    window: int

    def holds(self, index: int) -> bool:
        return (index >= self.images or index < self.prefix
                or index // self.batch_size in self.batches)


@dataclass
class Read:
    distinct: list[Candidate]  # in order; payload None where it was too big to keep
    skipped: list[Skip]
    tried: int
    decoded: int = 0  # decodes this process ran
    labels: bytes = b""  # digest of the usable candidates (labels, payload sizes), in order
    common: int | None = None  # leading records that every rank holds (None: all)
    _digest: Any = field(default_factory=lambda: hashlib.blake2b(digest_size=32), repr=False)


def load_one(candidate: Candidate, prep: Preprocess) -> np.ndarray | Skip:
    """A candidate's record, or a Skip saying why it cannot be used."""
    try:
        image = decode(candidate.payload, prep.mode)
    except Exception as e:  # a broken image is data, not a bug: skip it and count it
        text = _ADDRESS.sub("", one_line(e, 200, tidy=False))  # the same on every run
        return Skip(candidate.label, f"{type(e).__name__}: {text}")
    return prep.record(image)


def cheap(payload: Any) -> bool:
    """Whether keeping a payload costs nothing (a path, not the image's bytes)."""
    if isinstance(payload, dict):
        return not payload.get("bytes") and isinstance(payload.get("path"), (str, os.PathLike))
    return isinstance(payload, (str, os.PathLike))


def _log_skip(skip: Skip, nth: int) -> None:
    level = logging.WARNING if nth <= 5 else logging.DEBUG
    log.log(level, "Skipped undecodable image %s (%s)", skip.label, skip.reason)


def _keep(read: Read, candidate: Candidate, index: int, keep_heavy: int) -> None:
    if index < keep_heavy and not cheap(candidate.payload):
        candidate = Candidate(candidate.label, None)
    read.distinct.append(candidate)


def read_distinct(source: Source, prep: Preprocess, need: int, workers: int,
                  report: ProgressFn, put: PutFn, keep_heavy: int) -> Read:
    """Decode candidates in order until `need` usable images, handing each record to `put`
    with its index; skips are counted in order. Of the first `keep_heavy` candidates only
    cheap payloads (paths) are kept, for crops; in-memory ones (bytes) are dropped."""
    read = Read([], [], 0)
    results = imap_ordered(lambda c: load_one(c, prep), source.candidates, workers)
    try:
        for candidate, result in results:
            read.tried += 1
            read.decoded += 1
            if isinstance(result, Skip):
                read.skipped.append(result)
                _log_skip(result, len(read.skipped))
                continue
            index = len(read.distinct)
            put(index, result)
            _keep(read, candidate, index, keep_heavy)
            report(len(read.distinct), need)
            if len(read.distinct) == need:
                break
    finally:
        results.close()
    return read


def read_sharded(source: Source, prep: Preprocess, need: int, share: Share, workers: int,
                 report: ProgressFn, put: PutFn, keep_heavy: int) -> Read:
    """`read_distinct` split across the ranks: the same candidates, skips, indices and
    kept payloads on every rank, but `put` (in index order) only for the images this rank
    holds, each decoded here once (twice where a skip moved it). Collective: every rank
    calls it together; a failure on one rank stops them all (`together`)."""
    from ..distributed import all_reduce_sum_, collective_device, current, together

    ranks = current()
    read = Read([], [], 0, common=min(share.prefix, share.images))
    candidates = iter(source.candidates)
    while len(read.distinct) < need:
        found = len(read.distinct)
        width = min(need - found, share.window)
        with together():  # the first collective here: it also meets a rank that failed before
            window = list(itertools.islice(candidates, width))
            mine = [j for j in range(len(window)) if share.holds(found + j)]
            results = dict(zip(mine, _decode(window, mine, prep, workers)))
            read.decoded += len(mine)
        # per position: ranks that decoded it, ranks that could not; per rank: window length
        counts = torch.zeros(2 * width + ranks.world, dtype=torch.float64)
        for j, result in results.items():
            counts[j] += 1
            counts[width + j] += isinstance(result, Skip)
        counts[2 * width + ranks.rank] = len(window)
        counts = counts.to(collective_device())  # NCCL reduces GPU tensors only
        all_reduce_sum_([counts])
        counts = counts.cpu()
        with together():
            skip = _agree(counts, width, len(window), ranks.world)
            _place(read, window, results, skip, share, prep, workers, put, keep_heavy)
        report(len(read.distinct), need)
        if len(window) < width:  # the source has no more candidates
            break
    read.labels = read._digest.digest()
    return read


def _decode(window: list[Candidate], positions: Iterable[int], prep: Preprocess,
            workers: int) -> Iterator[np.ndarray | Skip]:
    for _, result in imap_ordered(lambda j: load_one(window[j], prep), positions, workers):
        yield result


def _agree(counts: torch.Tensor, width: int, length: int, world: int) -> list[bool]:
    """Which positions of the window every rank skips; refuses ranks that read other
    candidates, or decode one of them differently."""
    decoded, skipped = counts[:width].tolist(), counts[width : 2 * width].tolist()
    if set(counts[2 * width :].tolist()) != {float(length)}:
        raise DataError("The ranks found different numbers of calibration images; every "
                        "process must see the same --data (on several machines: the same "
                        "files).")
    for j in range(length):
        if not decoded[j] or 0 < skipped[j] < decoded[j]:
            raise DataError("The ranks decoded one calibration image differently; every "
                            "process must see the same --data and the same library versions "
                            "(Pillow) to decode it.")
    return [s > 0 for s in skipped[:length]]


def _place(read: Read, window: list[Candidate], results: dict, skip: list[bool], share: Share,
           prep: Preprocess, workers: int, put: PutFn, keep_heavy: int) -> None:
    """Give each usable candidate of the window its index; hand this rank's to `put`,
    decoding those a skip moved here (and the first skips' reasons, for the notes)."""
    index = len(read.distinct)
    targets = {}
    for j, skipped in enumerate(skip):
        if not skipped:
            targets[j] = index
            index += 1
    moved = [j for j, i in targets.items() if share.holds(i) and j not in results]
    reasons = [j for j in range(len(window)) if skip[j] and j not in results]
    reasons = [j for j in reasons if sum(skip[:j]) + len(read.skipped) < 3]
    todo = moved + reasons
    results.update(zip(todo, _decode(window, todo, prep, workers)))
    read.decoded += len(todo)
    for j, candidate in enumerate(window):
        read.tried += 1
        result = results.get(j)
        if skip[j]:
            reason = result.reason if isinstance(result, Skip) else "undecodable (another rank)"
            read.skipped.append(Skip(candidate.label, reason))
            if j in results and j not in reasons:
                _log_skip(read.skipped[-1], len(read.skipped))
            continue
        i = targets[j]
        read._digest.update(f"{candidate.label}\0{_size(candidate.payload)}\0".encode())
        if share.holds(i):
            if isinstance(result, Skip):
                raise DataError(f"Calibration image {candidate.label} decoded on another rank "
                                f"but not on this one ({result.reason}); every process must see "
                                "the same --data.")
            put(i, result)
        _keep(read, candidate, i, keep_heavy)


def _size(payload: Any) -> int | str:
    """A cheap trace of a payload's content: the byte count of a file or of the bytes."""
    if isinstance(payload, dict):
        payload = payload.get("bytes") or payload.get("path")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(payload, digest_size=16).hexdigest()
    if isinstance(payload, (str, os.PathLike)):
        try:
            return os.stat(payload).st_size
        except OSError:
            return -1
    return type(payload).__name__
