"""The on-disk spool: the preprocessed calibration images, one fixed-size record each, in a
temporary file, so that every pass after the first re-reads them instead of decoding again,
and memory stays flat however many images are asked for.

The file is unlinked as soon as it is opened where the OS allows it (POSIX): it lives only
as long as this process holds it, and a crash or a kill leaves nothing behind. Records are
written and read with positional I/O, not a memory map: the pages of a mapped file count
as the process's resident memory, the page cache behind read() does not.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import weakref

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)


class ImageSpool:
    """`count` records of `shape` and `dtype` in an anonymous temporary file.

    `write` may be called from several threads at once (each record is its own byte
    range); `read` fills consecutive records into a caller's buffer (for example pinned
    memory) and refuses records never written (under torchrun a rank writes only the
    images it holds: reading another one is a bug, not zeros). Close it when done (it is
    also closed when collected and at exit).
    """

    def __init__(self, count: int, shape: tuple[int, ...], dtype: np.dtype | str,
                 directory: str | None = None) -> None:
        self.count = int(count)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.record_bytes = math.prod(self.shape) * self.dtype.itemsize
        fd, path = tempfile.mkstemp(prefix="ckptinit-spool-", suffix=".bin", dir=directory)
        try:
            os.unlink(path)  # POSIX: the data lives until the descriptor is closed
            left = None
        except OSError:  # Windows: an open file cannot be removed; remove it at close
            left = path
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()  # only for systems without pread/pwrite
        self._written = np.zeros(self.count, dtype=bool)
        self._close = weakref.finalize(self, _release, fd, left)
        try:
            os.ftruncate(fd, self.count * self.record_bytes)  # sparse: no space used yet
        except OSError as e:
            self.close()
            raise _disk_error(e, self.nbytes) from None
        log.debug("spool: %d records of %s %s (%.1f MB) in %s", self.count, self.shape,
                  self.dtype, self.nbytes / 1e6, path)

    @property
    def nbytes(self) -> int:
        return self.count * self.record_bytes

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def __len__(self) -> int:
        return self.count

    def write(self, index: int, record: np.ndarray) -> None:
        """Store one record (exactly `shape` and `dtype`) at `index`."""
        if not 0 <= index < self.count:
            raise IndexError(f"spool record {index} out of range 0..{self.count - 1}")
        if record.shape != self.shape or record.dtype != self.dtype:
            raise ValueError(f"spool record must be {self.shape} {self.dtype}, got "
                             f"{record.shape} {record.dtype}")
        data = memoryview(np.ascontiguousarray(record)).cast("B")
        offset = index * self.record_bytes
        try:
            while data:
                done = self._pwrite(data, offset)
                data, offset = data[done:], offset + done
        except OSError as e:
            raise _disk_error(e, self.nbytes) from None
        self._written[index] = True

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Records [start, stop) as one (stop - start, *shape) array, into `out` if given."""
        if self.closed:
            raise ValueError("the calibration spool is closed (read its batches inside the "
                             "CalibrationSet's `with` block)")
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"spool records [{start}, {stop}) out of range 0..{self.count}")
        if not self._written[start:stop].all():
            missing = start + int(np.argmin(self._written[start:stop]))
            raise ValueError(f"spool record {missing} was never written (under torchrun a "
                             "rank holds only the images of its own batches)")
        if out is None:
            out = np.empty((stop - start, *self.shape), dtype=self.dtype)
        if out.shape != (stop - start, *self.shape) or out.dtype != self.dtype \
                or not out.flags.c_contiguous:
            raise ValueError("spool read buffer has the wrong shape, dtype or layout")
        view = memoryview(out.reshape(-1).view(np.uint8))
        offset = start * self.record_bytes
        while view:
            got = self._pread(view, offset)
            if got <= 0:
                raise DataError("The calibration spool file ended early; its temporary "
                                "folder was changed while ckptinit ran.")
            view, offset = view[got:], offset + got
        return out

    def close(self) -> None:
        self._close()

    def _pwrite(self, data: memoryview, offset: int) -> int:
        if hasattr(os, "pwrite"):
            return os.pwrite(self._fd, data, offset)
        with self._lock:
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.write(self._fd, data)

    def _pread(self, view: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self._fd, [view], offset)
        with self._lock:
            os.lseek(self._fd, offset, os.SEEK_SET)
            chunk = os.read(self._fd, len(view))
        view[: len(chunk)] = chunk
        return len(chunk)


def _release(fd: int, path: str | None) -> None:
    try:
        os.close(fd)
    finally:
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass


def _disk_error(e: OSError, nbytes: int) -> DataError:
    where = tempfile.gettempdir()
    return DataError(f"Cannot write the calibration spool ({nbytes / 1e9:.2f} GB) in '{where}': "
                     f"{e.strerror or e}; set TMPDIR to a folder with more room, or ask for "
                     "fewer --images.")
