"""The compute device: resolution, the TF32 scope (restored after), the model's home, the
resources in the report; on a CUDA machine, exact and sync-free batches on the device."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

from ckptinit.api import rescale
from ckptinit.data import load_calibration
from ckptinit.data.batches import TensorBatches
from ckptinit.device import model_device, on_device, precision, resolve_device
from ckptinit.errors import DeviceError, UsageError
from ckptinit.options import CalibrationOptions, RescaleOptions
from tests.conftest import smooth_images

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tf32_state():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto", torch.nn.Linear(2, 2)) == torch.device("cpu")  # stays put
    with pytest.raises(UsageError):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            resolve_device("cuda")


def test_precision_scope_sets_and_restores_tf32():
    before = _tf32_state()
    with precision("cuda", tf32=True):  # the flags exist without a GPU
        assert _tf32_state() in (("tf32", "tf32"), (True, True))
        with precision("cuda", tf32=False):
            assert _tf32_state() in (("ieee", "ieee"), (False, False))
        assert _tf32_state() in (("tf32", "tf32"), (True, True))
    assert _tf32_state() == before
    with pytest.raises(KeyError):
        with precision("cuda", tf32=True):
            raise KeyError("restored on errors too")
    assert _tf32_state() == before
    with precision("cpu", tf32=True):
        assert _tf32_state() == before


def test_on_device_reports_resources_and_keeps_a_cpu_model_home():
    model = torch.nn.Linear(2, 2)
    with on_device(model, "auto") as run:
        assert model_device(model) == run.device
        res = run.resources()
    assert model_device(model) == torch.device("cpu")
    assert res["device"] == str(run.device) and res["peak_rss_bytes"] > 10_000_000
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


def test_rescale_takes_a_tensor_or_a_stream_with_the_same_result():
    cal = CalibrationOptions(images=12, holdout=4, input_size=32)
    opts = RescaleOptions(batch_size=5, grad_batches=1, iters=2, device="cpu")
    states, reports = [], []
    with load_calibration(timm.create_model("test_resnet", num_classes=0), cal) as cs:
        for images in (cs.images, cs.batches(5)):
            torch.manual_seed(0)
            model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
            model, report = rescale(model, images, opts, holdout=cs.holdout)
            states.append(model.state_dict())
            reports.append(report)
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert reports[1].resources["device"] == "cpu"
    assert reports[1].resources["peak_rss_bytes"] > 0
    assert reports[1].within_passes == reports[0].within_passes > 1  # 3 batches: streamed
    assert reports[1].between_iterations == reports[0].between_iterations > 0


def test_empty_images_are_refused():
    with pytest.raises(UsageError):
        rescale(torch.nn.Conv2d(3, 4, 3), torch.empty(0, 3, 8, 8))


@cuda
def test_cuda_batches_equal_cpu_bit_for_bit_without_host_syncs():
    cal = CalibrationOptions(images=40, holdout=0, input_size=64)
    with load_calibration(timm.create_model("resnet18", num_classes=0), cal) as cs:
        cpu = list(cs.batches(16))
        gpu = cs.batches(16, "cuda")
        list(gpu)  # warm-up: the normaliser's constants move to the device once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = list(gpu)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        assert not syncs, [str(w.message) for w in syncs[:3]]
        assert all(b.device.type == "cuda" for b in out)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, out))
        from_tensor = list(TensorBatches(cs.images, 16, "cuda"))  # pinned, non-blocking
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, from_tensor))


@cuda
def test_cuda_rescale_reports_device_memory():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model, report = rescale(model, smooth_images(24, 64), RescaleOptions(
        batch_size=8, grad_batches=1, iters=2, device="cuda"))
    assert model_device(model).type == "cuda"  # an explicit device keeps the model there
    res = report.resources
    assert res["device"].startswith("cuda") and res["peak_device_bytes"] > 0
    assert res["device_name"]
