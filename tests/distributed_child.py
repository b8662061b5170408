"""`torchrun ... -m tests.distributed_child MODE ARGS...`: `ckptinit ARGS...` with rank 1
changed, the others not. MODE `fail`: rank 1 fails with an I/O error in the middle of the
within-layer step (its fifth unit output), while rank 0 waits for that rank's
statistics. MODE `full-disk`: rank 1's disk fills up while it spools the calibration
images (its sixth record), between two of the data stage's collectives. MODE a
directory: rank 1 runs there (as on another machine, where a relative --data names other
files). MODE `count=DIR`: every rank counts the images it opens (each call of PIL's
Image.open: a path, or in-memory bytes) and writes them, one a line, to DIR/rank<R>.txt
when it exits. Only this test helper is patched: the command runs unchanged."""

from __future__ import annotations

import os
import sys

FAIL_AT = 5  # the rank-1 unit output whose statistics fail


def fill_disk_in_spool() -> None:
    import errno

    from ckptinit.data.spool import ImageSpool

    real = ImageSpool._pwrite
    calls = [0]

    def failing(self, data, offset):
        calls[0] += 1
        if calls[0] == 6:
            raise OSError(errno.ENOSPC, "No space left on device (injected by the test)")
        return real(self, data, offset)

    ImageSpool._pwrite = failing


def count_opens(folder: str) -> None:
    import atexit
    from pathlib import Path

    from PIL import Image

    real = Image.open
    opened: list[str] = []

    def counting(fp, *args, **kwargs):
        opened.append(str(fp) if isinstance(fp, (str, os.PathLike)) else "<bytes>")
        return real(fp, *args, **kwargs)

    def write() -> None:
        out = Path(folder) / f"rank{os.environ.get('RANK', '0')}.txt"
        out.write_text("".join(f"{name}\n" for name in opened))

    Image.open = counting
    atexit.register(write)


def fail_in_within() -> None:
    from ckptinit.method.stats import Moments

    measure = Moments.of.__func__
    calls = [0]

    def failing(cls, z, channel_dim):
        calls[0] += 1
        if calls[0] == FAIL_AT:
            raise OSError(5, "Input/output error (injected by the test)")
        return measure(cls, z, channel_dim)

    Moments.of = classmethod(failing)


if __name__ == "__main__":
    mode = sys.argv.pop(1)
    if mode.startswith("count="):
        count_opens(mode.removeprefix("count="))
    elif os.environ.get("RANK") == "1":
        if mode == "fail":
            fail_in_within()
        elif mode == "full-disk":
            fill_disk_in_spool()
        else:
            os.chdir(mode)
    from ckptinit.cli import main

    main()
