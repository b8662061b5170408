"""`torchrun ... -m tests.distributed_child MODE ARGS...`: `ckptinit ARGS...` with rank 1
changed, the others not. MODE `fail`: rank 1 fails with an I/O error in the middle of the
within-layer step (its fifth unit output), while rank 0 waits for that rank's
statistics. MODE a directory: rank 1 runs there (as on another machine, where a relative
--data names other files). Only this test helper is patched: the command runs unchanged."""

from __future__ import annotations

import os
import sys

FAIL_AT = 5  # the rank-1 unit output whose statistics fail


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
    if os.environ.get("RANK") == "1":
        if mode == "fail":
            fail_in_within()
        else:
            os.chdir(mode)
    from ckptinit.cli import main

    main()
