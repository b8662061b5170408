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
        assert report.unit("fc").std_after == pytest.approx(1.0, abs=1e-3)
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
    assert "fc.weight" in same  # the loaded classifier is pinned
    meta = safe_open(str(out), "pt").metadata()
    assert meta["format"] == "pt" and meta["architecture"] == "resnet18"
    assert json.loads(meta["options"])["between"] is True


def test_measure_changes_nothing_and_reports_rates():
    model = pretend_trained(timm.create_model("resnet18", pretrained=False, num_classes=10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = measure(model, smooth_images(8, 32), RescaleOptions(grad_batches=1))
    assert all(u.rate_before and u.rate_before > 0 for u in report.units)
    assert all(u.std_before is not None for u in report.units)
    assert report.unit("fc").between_status == "pinned"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
