"""The pipeline (api.py): rescaling on top of existing checkpoints (issue 5), every layout,
end to end through the library call the CLI uses, with the function check and a strict reload
into timm; measuring changes nothing."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptinit.api import measure, rescale_checkpoint
from ckptinit.options import CalibrationOptions, RescaleOptions, SourceOptions
from tests.conftest import smooth_images
from tests.method.nets import pretend_trained

CAL = CalibrationOptions(images=16, holdout=8, input_size=32)
OPTS = RescaleOptions(batch_size=16, grad_batches=1, iters=3)


def trained_like_state(name: str = "resnet18", seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    sd = trained_like_state()
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    out = {}
    out["timm"] = root / "timm.safetensors"
    save_file(sd, out["timm"])
    out["torchvision"] = root / "tv.pth"
    torch.save(sd, out["torchvision"])
    out["moco"] = root / "moco.pth.tar"
    moco = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    moco["module.encoder_q.fc.0.weight"] = torch.randn(2048, 512)
    moco["module.queue"] = torch.randn(128, 4096)
    torch.save({"state_dict": moco, "epoch": 200, "arch": "resnet18"}, out["moco"])
    out["dino"] = root / "dino.pth"
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher["head.mlp.0.weight"] = torch.randn(256, 512)
    student = {f"module.backbone.{k}": v + 1 for k, v in backbone.items()}
    torch.save({"teacher": teacher, "student": student}, out["dino"])
    model = timm.create_model("resnet18", pretrained=False)
    model.load_state_dict(sd)
    folder = root / "folder"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    out["local-dir"] = folder
    return sd, out


@pytest.mark.parametrize("layout,num_classes", [
    ("timm", None), ("torchvision", None), ("moco", 0), ("dino", 10), ("local-dir", None),
])
def test_rescale_on_top_of_each_layout(layouts, layout, num_classes, tmp_path):
    sd, paths = layouts
    path = paths[layout]
    source = f"local-dir:{path}" if layout == "local-dir" else str(path)
    arch = None if layout == "local-dir" else "resnet18"
    out = tmp_path / "out.safetensors"
    report = rescale_checkpoint(
        source, out, options=OPTS, calib_options=CAL,
        source_options=SourceOptions(arch=arch, num_classes=num_classes),
    )
    # the promise: outputs on held-out images unchanged by the between-layer step
    fc = report.function_check
    assert fc.enforced and fc.rel_change <= 1e-4
    assert report.rate_spread("after") < report.rate_spread("before")
    # extras dropped and listed; a new head initialised by the within-layer step
    if layout == "moco":
        assert "module.queue" in report.source["dropped_keys"]
        assert not [u for u in report.units if u.name == "fc"]  # headless
    if layout == "dino":
        assert "head.mlp.0.weight" in report.source["dropped_keys"]
        assert report.unit("fc").action.endswith("normalize")
        assert report.unit("fc").std_after == pytest.approx(OPTS.head_std, abs=1e-3)
    # loads strictly into timm and computes finite outputs
    ncls = 1000 if num_classes is None else num_classes
    model = timm.create_model("resnet18", pretrained=False, num_classes=ncls)
    model.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()
    # tensors the tool did not change are written back bit for bit
    saved = load_file(out)
    untouched = [k for k in saved if k.endswith("num_batches_tracked")]
    assert all(torch.equal(saved[k], sd[k]) for k in untouched)
    assert any(torch.equal(saved[k], sd[k]) for k in saved if k.startswith("layer4.1.bn2"))


def test_unchanged_tensors_keep_their_dtype(tmp_path):
    sd = trained_like_state()
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    src = tmp_path / "half.safetensors"
    save_file(half, src)
    out = tmp_path / "out.safetensors"
    rescale_checkpoint(str(src), out, options=OPTS, calib_options=CAL,
                       source_options=SourceOptions(arch="resnet18"))
    saved = load_file(out)
    assert all(saved[k].dtype == half[k].dtype for k in half)
    # the running statistics of a BN whose conv was not moved stay bit for bit
    same = [k for k in half if torch.equal(saved[k], half[k])]
    assert "fc.bias" in same  # the output is an anchor: the classifier's bias never moves
    meta = safe_open(str(out), "pt").metadata()
    assert meta["format"] == "pt" and meta["architecture"] == "resnet18"
    assert json.loads(meta["options"])["between"] is True


def test_measure_changes_nothing_and_reports_rates():
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = measure(model, smooth_images(8, 32), RescaleOptions(grad_batches=1))
    assert all(u.rate_before and u.rate_before > 0 for u in report.units)
    assert all(u.std_before is not None for u in report.units)
    # the classifier moves only against the last BatchNorms (the output is an anchor)
    assert "layer4.1.bn2" in report.unit("fc").compensation
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --------------------------------------------------------------------------- boundaries
TINY_CAL = CalibrationOptions(images=4, holdout=2, input_size=32)
TINY_OPTS = RescaleOptions(device="cpu", batch_size=8, grad_batches=1, iters=1)


def test_the_library_leaves_the_global_rng_alone(tmp_path):
    from ckptinit.api import measure_source, rescale

    state = torch.random.get_rng_state()
    rescale_checkpoint("test_resnet", tmp_path / "a.safetensors", options=TINY_OPTS,
                       calib_options=TINY_CAL)
    measure_source("test_resnet", options=TINY_OPTS, calib_options=TINY_CAL)
    rescale(timm.create_model("test_resnet"), smooth_images(4), TINY_OPTS)
    after = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    timm.create_model("test_resnet")  # what the creation above drew, and nothing more
    assert torch.equal(after, torch.random.get_rng_state())


def test_auto_device_leaves_the_callers_model_where_it_is(monkeypatch):
    from ckptinit.api import rescale, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")  # the library's own models
    model = timm.create_model("test_resnet")
    model, _ = rescale(model, smooth_images(4), RescaleOptions(device="auto", batch_size=8,
                                                               grad_batches=1, iters=1))
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_processed_in_float32_and_written_back(tmp_path, monkeypatch, dtype):
    import ckptinit.pipeline

    sd = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in trained_like_state("test_resnet").items()}
    save_file(sd, tmp_path / "half.safetensors")
    seen = []
    real = ckptinit.pipeline.rescale

    def spy(model, *args, **kwargs):
        seen.append({p.dtype for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ckptinit.pipeline, "rescale", spy)
    out = tmp_path / "out.safetensors"
    rescale_checkpoint(str(tmp_path / "half.safetensors"), out, options=TINY_OPTS,
                       source_options=SourceOptions(arch="test_resnet"), calib_options=TINY_CAL)
    assert seen == [{torch.float32}]
    result = load_file(out)
    assert {k: v.dtype for k, v in result.items()} == {k: v.dtype for k, v in sd.items()}
    assert all(torch.isfinite(v.float()).all() for v in result.values())
    assert any(not torch.equal(result[k], sd[k]) for k in sd if k.endswith("conv.weight")
               or k.endswith("conv1.0.weight"))


def _net(bias: float | None = None, zero: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        if bias is not None:
            net[0].bias.fill_(bias)  # every first-layer ReLU dead
        if zero:
            net[2].weight.zero_()
            net[2].bias.zero_()
    return net


@pytest.mark.parametrize("case", ["constant images", "all-zero layer", "dead ReLUs"])
@pytest.mark.parametrize("within", [None, True])
def test_degenerate_units_never_give_inf_or_nan(case, within):
    from ckptinit.api import rescale

    images = torch.full((8, 3, 16, 16), 0.5) if case == "constant images" else smooth_images(8, 16)
    net = _net(bias=-100.0 if case == "dead ReLUs" else None, zero=case == "all-zero layer")
    options = RescaleOptions(device="cpu", batch_size=8, grad_batches=1, within=within,
                             weights="keep" if within else None)
    net, report = rescale(net, images, options, fresh=set() if case != "constant images" else None)
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    json.dumps(report.to_dict(), allow_nan=False, default=str)  # no NaN or Inf anywhere
    assert torch.isfinite(net(smooth_images(2, 16))).all()


def test_a_result_with_non_finite_values_is_never_written(tmp_path, monkeypatch):
    import ckptinit.pipeline
    from ckptinit.errors import OutputError

    real = ckptinit.pipeline.rescale

    def broken(model, *args, **kwargs):
        model, report = real(model, *args, **kwargs)
        with torch.no_grad():
            model.fc.bias[0] = float("nan")
        return model, report

    monkeypatch.setattr(ckptinit.pipeline, "rescale", broken)
    with pytest.raises(OutputError, match=r"fc.bias \(float32: 1 NaN\)"):
        rescale_checkpoint("test_resnet", tmp_path / "o.safetensors", options=TINY_OPTS,
                           calib_options=TINY_CAL)
    assert list(tmp_path.iterdir()) == []
