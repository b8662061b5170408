"""The on-disk spool: records round-trip exactly, from many threads, and leave no file."""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ckptinit.data.spool import ImageSpool
from ckptinit.errors import DataError


def test_records_round_trip_from_threads():
    rng = np.random.default_rng(0)
    records = rng.integers(0, 256, (37, 3, 5, 7), dtype=np.uint8)
    spool = ImageSpool(37, (3, 5, 7), np.uint8)
    with ThreadPoolExecutor(4) as pool:  # out of order, concurrently
        list(pool.map(lambda i: spool.write(i, records[i]), reversed(range(37))))
    assert np.array_equal(spool.read(0, 37), records)
    out = np.empty((5, 3, 5, 7), np.uint8)
    assert spool.read(30, 35, out=out) is out and np.array_equal(out, records[30:35])
    assert spool.read(4, 4).shape == (0, 3, 5, 7)
    assert spool.nbytes == 37 * 105 and len(spool) == 37
    spool.close()
    assert spool.closed
    with pytest.raises(ValueError, match="closed"):
        spool.read(0, 1)


def test_float_records_and_refusals():
    spool = ImageSpool(2, (1, 2, 2), "float32")
    x = np.arange(4, dtype=np.float32).reshape(1, 2, 2) / 3
    spool.write(1, x)
    assert np.array_equal(spool.read(1, 2)[0], x)
    with pytest.raises(ValueError):
        spool.write(0, x.astype(np.float64))
    with pytest.raises(ValueError):
        spool.write(0, x.reshape(2, 2))
    with pytest.raises(IndexError):
        spool.write(2, x)
    with pytest.raises(IndexError):
        spool.read(1, 3)
    with pytest.raises(ValueError):
        spool.read(0, 2, out=np.empty((2, 1, 2, 2), np.float64))
    spool.close()


@pytest.mark.skipif(os.name != "posix", reason="POSIX removes open files at once")
def test_no_file_is_left(tmp_path):
    spool = ImageSpool(3, (2,), np.uint8, directory=str(tmp_path))
    spool.write(0, np.array([1, 2], np.uint8))
    assert list(tmp_path.iterdir()) == []  # unlinked while in use: nothing to clean up
    assert spool.read(0, 1).tolist() == [[1, 2]]
    spool.close()
    spool.close()  # twice is fine


def test_full_disk_is_a_one_line_data_error(monkeypatch):
    spool = ImageSpool(1, (4,), np.uint8)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(DataError) as err:
        spool.write(0, np.zeros(4, np.uint8))
    text = str(err.value)
    assert "\n" not in text and "TMPDIR" in text and "--images" in text
    spool.close()


def test_records_never_written_cannot_be_read():
    """Under torchrun a rank writes only the images it holds: reading another one is a bug
    that must not come back as zeros."""
    with_gap = ImageSpool(4, (2, 3), np.uint8)
    try:
        for i in (0, 1, 3):
            with_gap.write(i, np.full((2, 3), i, np.uint8))
        assert with_gap.read(0, 2)[1].max() == 1 and with_gap.read(3, 4)[0].max() == 3
        with pytest.raises(ValueError, match="record 2 was never written"):
            with_gap.read(1, 4)
    finally:
        with_gap.close()
