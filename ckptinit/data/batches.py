"""Calibration batches as a re-iterable stream: what every step of the method consumes.

A `Batches` yields the same (B, C, H, W) float32 batches, in the same order, on every
iteration, already on the target device; it never holds more than two of them. While the
device works on one batch, a background thread reads the next (from the on-disk spool, or
slices the caller's tensor) into pinned host memory when the target is CUDA, and the copy
to the device is non-blocking. A plain list of tensors on the device satisfies the same
use (`iter`, `len`, `first_images`); `as_batches` turns a tensor, a list or a `Batches`
into one of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from .spool import ImageSpool


class Batches(Protocol):
    """Re-iterable: every iter() yields the same batches, in the same order."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...  # (B, C, H, W) on the target device

    def __len__(self) -> int: ...  # number of batches

    @property
    def num_images(self) -> int: ...

    def first(self, n: int | None = None) -> torch.Tensor: ...  # first n (may span batches)


BatchesLike = Batches | Sequence[torch.Tensor] | torch.Tensor


def first_images(batches: Batches | Sequence[torch.Tensor], n: int | None = None
                 ) -> torch.Tensor:
    """The first `n` images (all there are, if fewer) of a `Batches` or a list of batches."""
    first = getattr(batches, "first", None)
    if callable(first):
        return first(n)
    if n is None:
        return batches[0]
    return torch.cat(list(batches))[:n] if batches[0].shape[0] < n else batches[0][:n]


def count_images(batches: Batches | Sequence[torch.Tensor]) -> int:
    """Number of images in a `Batches` or a list of batches."""
    n = getattr(batches, "num_images", None)
    return int(n) if n is not None else sum(int(b.shape[0]) for b in batches)


class _Stream:
    """Shared by the spool and tensor streams: batching, prefetching, device transfer.

    A subclass provides `_load(start, stop, buffer)` (host side, run ahead in a background
    thread: only reads and copies, so that every allocation the consumer keeps is made in
    its own thread; allocating in the reader thread grows glibc's per-thread arenas with the
    number of batches) and `_finish(host)` (in the caller's thread: a new tensor on the
    device, so that `buffer` can be reused for the batch after next).
    """

    def __init__(self, num_images: int, batch_size: int, device: torch.device | str,
                 prefetch: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._count = int(num_images)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.prefetch = prefetch

    @property
    def num_images(self) -> int:
        return self._count

    @property
    def pinned(self) -> bool:
        """Host batches go through pinned memory (the target is CUDA)."""
        return self.device.type == "cuda"

    def __len__(self) -> int:
        return math.ceil(self._count / self.batch_size)

    def _range(self, i: int) -> tuple[int, int]:
        start = i * self.batch_size
        return start, min(start + self.batch_size, self._count)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.select(range(len(self)))

    def select(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        """The batches at `indices` (in that order), prefetched like a full pass: one rank's
        share of the batches (distributed.shard)."""
        n = len(indices)
        ring = self._ring()  # host buffers reused batch after batch (or Nones)
        if not self.prefetch or n <= 1:
            for j, i in enumerate(indices):
                yield self._finish(self._load(*self._range(i), ring[j % 2]))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptinit-prefetch") as pool:
            ahead = pool.submit(self._load, *self._range(indices[0]), ring[0])
            for j in range(n):
                host = ahead.result()
                if j + 1 < n:  # batch j's buffer is free again once _finish has copied it
                    ahead = pool.submit(self._load, *self._range(indices[j + 1]),
                                        ring[(j + 1) % 2])
                yield self._finish(host)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Batch `i` alone (reads only that batch): for code that still indexes batches."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"batch {i} out of range ({n} batches)")
        return self._finish(self._load(*self._range(i % n), None))

    def first(self, n: int | None = None) -> torch.Tensor:
        """The first `n` images (default: the first batch; all there are if fewer), for
        probes and tracing: with --batch-size 1 or 2 a probe still gets its images."""
        n = self.batch_size if n is None else int(n)
        if n < 1:
            raise ValueError(f"first() takes at least 1 image, got {n}")
        return self._finish(self._load(0, min(n, self._count), None))

    def _ring(self) -> list[torch.Tensor | None]:
        return [None, None]

    def _load(self, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self, host: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SpoolBatches(_Stream):
    """Batches read from an `ImageSpool` (uint8 pixels normalised on the device, or float32).

    The spool is shared, not owned: closing it is its creator's job (`CalibrationSet`).
    """

    def __init__(self, spool: ImageSpool, batch_size: int, device: torch.device | str = "cpu",
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 prefetch: bool = True) -> None:
        super().__init__(spool.count, batch_size, device, prefetch)
        if spool.dtype.name == "uint8" and normalize is None:
            raise ValueError("a uint8 spool needs a normalize function")
        self.spool = spool
        self.normalize = normalize
        self._dtype = torch.from_numpy(np.empty(0, dtype=spool.dtype)).dtype

    def to(self, device: torch.device | str) -> SpoolBatches:
        """The same images, yielded on another device."""
        device = torch.device(device)
        if device == self.device:
            return self
        return SpoolBatches(self.spool, self.batch_size, device, self.normalize, self.prefetch)

    def _ring(self) -> list[torch.Tensor | None]:
        if self.pinned:  # pinned blocks come from torch's caching host allocator, which
            return [None, None]  # hands one out again only once its copy is done
        shape = (min(self.batch_size, self._count), *self.spool.shape)
        return [torch.empty(shape, dtype=self._dtype) for _ in range(2)]

    def _load(self, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        shape = (stop - start, *self.spool.shape)
        host = buffer[: stop - start] if buffer is not None else \
            torch.empty(shape, dtype=self._dtype, pin_memory=self.pinned)
        self.spool.read(start, stop, out=host.numpy())
        return host

    def _finish(self, host: torch.Tensor) -> torch.Tensor:
        if self.pinned:
            x = host.to(self.device, non_blocking=True)
        else:
            x = host if self._dtype == torch.uint8 else host.clone()  # the buffer is reused
        return self.normalize(x) if x.dtype == torch.uint8 else x


class TensorBatches(_Stream):
    """Consecutive slices of an (N, C, H, W) tensor, moved to `device` one batch at a time
    (slices are views when the tensor is already there)."""

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device | str,
                 prefetch: bool = True) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        super().__init__(images.shape[0], batch_size, device, prefetch)
        self.images = images
        self.prefetch = prefetch and images.device != self.device

    def to(self, device: torch.device | str) -> TensorBatches:
        device = torch.device(device)
        if device == self.device:
            return self
        return TensorBatches(self.images, self.batch_size, device)

    def _load(self, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        x = self.images[start:stop]
        if self.pinned and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()  # a copy into the caching host allocator, freed after the copy
        return x

    def _finish(self, host: torch.Tensor) -> torch.Tensor:
        if host.device == self.device:
            return host
        return host.to(self.device, non_blocking=host.is_pinned())


def as_batches(images: BatchesLike, batch_size: int, device: torch.device | str
               ) -> Batches | list[torch.Tensor]:
    """A tensor (batched by `batch_size`), a list of batches or a `Batches` -> a `Batches`
    on `device`. A `Batches` keeps its own batch size; one with a `to` method is moved."""
    device = torch.device(device)
    if isinstance(images, torch.Tensor):
        return TensorBatches(images, batch_size, device)
    if isinstance(images, (list, tuple)):  # the caller's batches, already in memory
        if not all(isinstance(b, torch.Tensor) for b in images):
            raise TypeError("a list of batches must hold tensors")
        return [b.to(device) for b in images]
    move = getattr(images, "to", None)
    return move(device) if callable(move) else images
