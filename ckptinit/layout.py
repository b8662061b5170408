"""The memory layout the method's passes run in (`--memory-format`).

On the CPU a plain conv-net forward runs markedly faster with channels-last weights
(oneDNN's native layout: resnet50 and vgg11 no-grad forwards took 1.3-1.7x less time on
this project's 2-core machine); the feature maps then flow channels-last from the first
convolution on, without converting the input images. `auto` is the default: on a quiet
machine the whole `rescale` process ran 1.25-1.34x faster (benchmarks/speed.py, process
section); under heavy contention one round was slower. The caller's
model comes back with every tensor in the layout it had (bit for bit the same values;
safetensors needs the contiguous layout a freshly built model has), and the statistics are
layout-independent (method/stats.py sums channels-last outputs as an (N*H*W, C) matrix).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def wants_channels_last(model: nn.Module, device: torch.device, mode: str) -> bool:
    """channels-last: always (when the model has 2-D convolutions); contiguous: never; auto:
    on the CPU, for conv nets (at least half of the weighted layers 2-D convolutions), not
    for transformers or conv-MLP hybrids whose time goes to Linear layers."""
    if mode == "contiguous":
        return False
    unsafe = _onednn_unsafe(model) if torch.device(device).type == "cpu" else None
    if unsafe is not None:
        (log.warning if mode == "channels-last" else log.debug)(
            "passes run contiguous: %s is a strided 1x1 convolution with fewer than 16 input "
            "channels, whose channels-last weight gradient corrupts memory on the CPU "
            "(oneDNN issue 6035)", unsafe)
        return False
    units = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                          nn.Linear))]
    convs = sum(isinstance(m, nn.Conv2d) for m in units)
    if mode == "channels-last":
        return convs > 0
    return torch.device(device).type == "cpu" and convs > 0 and 2 * convs >= len(units)


def _onednn_unsafe(model: nn.Module) -> str | None:
    """The first 2-D 1x1 convolution with a stride and under 16 input channels per group:
    oneDNN's channels-last backward-weights kernel for it writes past its workspace (heap
    corruption or wrong gradients; uxlfoundation/oneDNN#6035, RepVGG's stem)."""
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
                and max(m.stride) > 1 and m.in_channels // m.groups < 16):
            return name
    return None


@contextlib.contextmanager
def memory_layout(model: nn.Module, device: torch.device, mode: str = "auto"
                  ) -> Iterator[bool]:
    """Run the block with the model's 4-D tensors channels-last when `wants_channels_last`
    (yields whether it did); afterwards every parameter and buffer has its own strides back.
    In-place changes made in the block (the method's rewrites) are kept."""
    if not wants_channels_last(model, device, mode):
        yield False
        return
    before = {key: t.stride() for key, t in _tensors(model)}
    model.to(memory_format=torch.channels_last)  # in place: the Parameter objects stay
    log.debug("passes run channels-last (--memory-format %s)", mode)
    try:
        yield True
    finally:
        _restore_strides(model, before)


def _tensors(model: nn.Module) -> Iterator[tuple[tuple[int, str, str], torch.Tensor]]:
    """The 4-D parameters and buffers, keyed by (module, kind, name): `model.to` keeps a
    Parameter object but puts a new tensor in place of a buffer."""
    for module in model.modules():
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, t in table.items():
                if t is not None and t.dim() == 4:
                    yield (id(module), kind, name), t


def _restore_strides(model: nn.Module, before: dict) -> None:
    with torch.no_grad():
        tables = {id(m): m for m in model.modules()}
        for key, t in list(_tensors(model)):
            stride = before.get(key)
            if stride is None or t.stride() == stride:
                continue
            data = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
            data.copy_(t)
            if key[1] == "param":
                t.data = data
            else:
                tables[key[0]]._buffers[key[2]] = data
