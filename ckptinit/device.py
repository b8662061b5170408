"""The compute device of a run: which one (`--device`), how precise its float32 maths is
(TF32 for the statistics passes, IEEE float32 where outputs are compared to 1e-4), and what
the run used (peak host and device memory, for the report)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DeviceError, UsageError

log = logging.getLogger(__name__)


def resolve_device(device: str, model: nn.Module | None = None) -> torch.device:
    """auto -> where `model` already is (a caller's model stays put), or, with no model,
    cuda when available, else cpu; an unavailable device is a clear error."""
    if device == "auto":
        if model is not None:
            return model_device(model)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"Unknown device '{device}'; use auto, cpu or cuda.") from e
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {device} was asked for but no CUDA device is "
                              "available here; use --device cpu (or auto).")
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"--device {device} was asked for but only {count} CUDA "
                              f"device(s) exist; use cuda:0 to cuda:{count - 1}.")
    return resolved


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; cpu for an empty model."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class DeviceRun:
    """The device a run computes on; `resources()` says what it used so far."""

    device: torch.device

    def resources(self) -> dict:
        """Peak resident memory of the process (host), and on CUDA the peak memory this run
        allocated on the device, the card's name and whether TF32 was allowed."""
        out: dict = {"device": str(self.device), "peak_rss_bytes": peak_rss_bytes()}
        if self.device.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name(self.device)
            out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


@contextlib.contextmanager
def on_device(model: nn.Module, device: str) -> Iterator[DeviceRun]:
    """Run on `device` (auto/cpu/cuda; auto: where the model already is) with TF32 matmuls
    allowed on CUDA. The model is moved there and stays there."""
    target = resolve_device(device, model)
    model.to(target)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    with precision(target, tf32=True):
        yield DeviceRun(target)


@contextlib.contextmanager
def one_thread(device: torch.device | str) -> Iterator[None]:
    """Run small CPU work on one intra-op thread, restored after. On busy shared cores
    OpenMP's spinning threads cost more than they give: QR and eigh of a few hundred columns
    took 2-4 s on two threads against 0.01-0.1 s on one, and a resnet50 forward of two
    images 2.6 s against 0.15 s (2-core machine, load 3; on a quiet one two threads are up
    to twice as fast). Nothing changes on other devices."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def precision(device: torch.device | str, tf32: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 for float32 matmuls and convolutions on CUDA, restored after.

    Statistics accumulate in float64 whatever this says; steps that compare outputs to a
    tight tolerance (the function check) run with tf32=False. Uses torch's per-backend
    `fp32_precision` settings where they exist (torch >= 2.9; mixing them with the legacy
    `allow_tf32` flags is an error there), else the legacy flags. Nothing changes on CPU.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    settings = _tf32_settings()
    try:
        saved = [getattr(obj, name) for obj, name, _ in settings]
        for obj, name, values in settings:
            setattr(obj, name, values[0] if tf32 else values[1])
    except RuntimeError as e:  # the user mixed the two torch APIs: leave theirs alone
        log.debug("TF32 settings left unchanged: %s", e)
        yield
        return
    try:
        yield
    finally:
        for (obj, name, _), value in zip(settings, saved):
            setattr(obj, name, value)


def _tf32_settings() -> list[tuple[object, str, tuple]]:
    """(object, attribute, (value allowing TF32, value forbidding it)) for matmul and conv."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", ("tf32", "ieee")),
                (conv, "fp32_precision", ("tf32", "ieee"))]
    return [(torch.backends.cuda.matmul, "allow_tf32", (True, False)),
            (torch.backends.cudnn, "allow_tf32", (True, False))]


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far, None where unknown.

    VmHWM from /proc where there is one: on Linux getrusage's ru_maxrss also counts the
    memory of the process that forked this one (it survives exec).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB
