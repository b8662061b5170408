"""`python -m tests.cli.interrupt_child STAGE ARGS...`: run `ckptinit ARGS...`, pausing at
STAGE (reading, within, between, writing) so that a test can signal it there.

At the pause it writes `PAUSED STAGE` on stderr and sleeps; the test then sends SIGINT or
SIGTERM. Only this test helper is patched: the command runs unchanged around it.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch

PAUSE_SECONDS = 60  # longer than any test waits: a pause that is not interrupted fails it


def pause(stage: str) -> None:
    os.write(2, f"PAUSED {stage}\n".encode())
    time.sleep(PAUSE_SECONDS)


def pause_in_forward(fn, stage: str):
    """Wrap a method step (model first): pause inside its first forward pass."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        handle = conv.register_forward_pre_hook(lambda module, inputs: pause(stage))
        try:
            return fn(model, *args, **kwargs)
        finally:
            handle.remove()
    return wrapper


def install(stage: str) -> None:
    if stage == "reading":
        from ckptinit.cli.ui import Ui

        progress = Ui.progress

        def paused_progress(self, name, done, total):
            progress(self, name, done, total)
            if name == "reading images" and done == 3:
                pause(stage)
        Ui.progress = paused_progress
    elif stage == "within":
        import ckptinit.api

        ckptinit.api.normalize_within_ = pause_in_forward(ckptinit.api.normalize_within_, stage)
    elif stage == "between":
        import ckptinit.method.between as between

        between.rescale_between_ = pause_in_forward(between.rescale_between_, stage)
    elif stage == "writing":
        import safetensors.torch

        save_file = safetensors.torch.save_file

        def paused_save_file(*args, **kwargs):
            save_file(*args, **kwargs)  # the temporary file is complete, not yet renamed
            pause(stage)
        safetensors.torch.save_file = paused_save_file
    else:
        raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    install(sys.argv[1])
    from ckptinit.cli import app

    app(args=sys.argv[2:], prog_name="ckptinit")
