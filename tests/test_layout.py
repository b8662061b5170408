"""The passes' memory layout (layout.py): conv nets run channels-last on the CPU, the
caller's model comes back in its own layout, and the results are those of the contiguous
layout to float32 rounding."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from ckptinit.api import rescale, rescale_checkpoint
from ckptinit.layout import memory_layout, wants_channels_last
from ckptinit.options import CalibrationOptions, RescaleOptions
from tests.conftest import smooth_images

CPU = torch.device("cpu")


class _Blur(nn.Module):
    """A conv net with a 4-D buffer (like timm's BlurPool filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("filt", torch.ones(4, 2, 3, 3) / 9)

    def forward(self, x):
        return nn.functional.conv2d(self.conv(x), self.filt, groups=2)


def test_which_models_run_channels_last():
    resnet = timm.create_model("resnet18", pretrained=False)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert wants_channels_last(resnet, CPU, "auto")
    assert not wants_channels_last(vit, CPU, "auto")  # its time goes to Linear layers
    assert wants_channels_last(vit, CPU, "channels-last")  # asked for: its patch conv
    assert not wants_channels_last(resnet, CPU, "contiguous")
    assert not wants_channels_last(resnet, torch.device("cuda"), "auto")
    assert not wants_channels_last(nn.Linear(3, 3), CPU, "channels-last")


def test_a_strided_1x1_conv_on_few_channels_keeps_the_contiguous_layout(caplog):
    # oneDNN's channels-last weight gradient of such a conv corrupts the heap (RepVGG's stem:
    # `ckptinit rescale repvgg_a0` died with "free(): invalid size"); 16 channels are fine
    def net(cin: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, 8, 1, stride=stride), nn.Conv2d(8, 8, 3))

    assert not wants_channels_last(net(3, 2), CPU, "auto")
    assert not wants_channels_last(net(12, 2), CPU, "channels-last")
    assert "oneDNN" in caplog.text
    assert wants_channels_last(net(16, 2), CPU, "auto")
    assert wants_channels_last(net(3, 1), CPU, "auto")
    assert not wants_channels_last(timm.create_model("repvgg_a0", pretrained=False), CPU, "auto")


def test_the_layout_comes_back_and_changes_are_kept():
    model = _Blur()
    model.conv.weight.data = model.conv.weight.data.contiguous(
        memory_format=torch.channels_last)  # the caller's own choice: kept
    weight, strides = model.conv.weight, model.conv.weight.stride()
    with memory_layout(model, CPU, "auto") as used:
        assert used
        assert model.filt.is_contiguous(memory_format=torch.channels_last)
        assert not model.filt.is_contiguous()
        with torch.no_grad():
            model.conv.weight.mul_(2)
            model.filt.add_(1)
    assert model.conv.weight is weight and weight.stride() == strides
    assert model.filt.is_contiguous()
    torch.testing.assert_close(model.filt, torch.ones(4, 2, 3, 3) / 9 + 1)
    with memory_layout(model, CPU, "contiguous") as used:
        assert not used


def _rescaled(fmt: str):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    opts = RescaleOptions(memory_format=fmt, batch_size=8, iters=2, grad_batches=1)
    return rescale(model, smooth_images(16, 48), opts, holdout=smooth_images(8, 48, seed=1))


def test_channels_last_results_equal_the_contiguous_ones():
    a, ra = _rescaled("contiguous")
    b, rb = _rescaled("channels-last")
    c, _ = _rescaled("auto")  # on the CPU: channels-last, deterministic
    for model in (a, b, c):
        assert all(t.is_contiguous() for t in model.state_dict().values())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sb[k], sc[k]) for k in sb)
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-3, atol=1e-4 * sa[k].abs().max())
    for ua, ub in zip(ra.units, rb.units):
        for field in ("mean_before", "std_before", "std_after", "std_heldout"):
            x, y = getattr(ua, field), getattr(ub, field)
            assert (x is None) == (y is None)
            if x is not None:
                assert y == pytest.approx(x, rel=1e-3, abs=1e-5), (ua.name, field)
    assert rb.output_std == pytest.approx(ra.output_std, rel=1e-3)


def test_the_saved_checkpoint_loads_strictly_into_timm(tmp_path):
    out = tmp_path / "r.safetensors"
    rescale_checkpoint("resnet18", out, options=RescaleOptions(batch_size=8, iters=1,
                                                               grad_batches=1),
                       calib_options=CalibrationOptions(images=8, holdout=4, input_size=32))
    model = timm.create_model("resnet18", pretrained=False)
    model.load_state_dict(load_file(out), strict=True)


def test_an_unknown_layout_is_a_usage_error():
    from ckptinit.errors import UsageError

    with pytest.raises(UsageError, match="--memory-format"):
        RescaleOptions(memory_format="nhwc").check()
