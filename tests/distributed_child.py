"""`torchrun ... -m tests.distributed_child ARGS...`: `ckptinit ARGS...`, in which rank 1
fails with an I/O error in the middle of the within-layer step (its fifth unit output),
while rank 0 waits for that rank's statistics. Only this test helper is patched: the
command runs unchanged around it, and rank 0 not at all."""

from __future__ import annotations

import os

FAIL_AT = 5  # the rank-1 unit output whose statistics fail


def install() -> None:
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
    if os.environ.get("RANK") == "1":
        install()
    from ckptinit.cli import main

    main()
