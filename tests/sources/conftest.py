"""Every checkpoint layout, built once for the source tests."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.sources.helpers import Custom, _backbone, _r18_state, _shift


@pytest.fixture(scope="package")
def ck(tmp_path_factory) -> dict:
    """Every checkpoint layout, built once for the package (resnet18; one resnet50)."""
    root = tmp_path_factory.mktemp("ckpts")
    sd = _r18_state()
    bb = _backbone(sd)
    out: dict = {"sd": sd, "root": root}

    out["plain"] = root / "plain" / "r18.safetensors"
    out["plain"].parent.mkdir()
    save_file(sd, out["plain"])

    # timm's own folder format: config.json + model.safetensors (also a local-dir: source)
    model = timm.create_model("resnet18")
    model.load_state_dict(sd)
    out["folder"] = root / "folder"
    timm.models.save_for_hf(model, str(out["folder"]), safe_serialization=True)

    fp16 = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    out["fp16"] = root / "fp16.safetensors"
    save_file(fp16, out["fp16"])
    out["bf16"] = root / "bf16.pt"
    bf16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(bf16, out["bf16"])

    import torchvision

    tv = torchvision.models.resnet18().state_dict()
    assert {k: v.shape for k, v in tv.items()} == {k: v.shape for k, v in sd.items()}
    out["tv_sd"] = tv
    out["tv"] = root / "resnet18-torchvision.pth"
    torch.save(tv, out["tv"])

    # MoCo v2: DDP wrapper, query and key encoders, MLP head, queue, training state
    moco = {f"module.encoder_q.{k}": v for k, v in bb.items()}
    moco |= {f"module.encoder_k.{k}": v for k, v in _shift(bb, 1.0).items()}
    moco |= {
        "module.encoder_q.fc.0.weight": torch.randn(512, 512),
        "module.encoder_q.fc.0.bias": torch.randn(512),
        "module.encoder_q.fc.2.weight": torch.randn(128, 512),
        "module.encoder_q.fc.2.bias": torch.randn(128),
        "module.queue": torch.randn(128, 4096),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    out["moco"] = root / "checkpoint_0199.pth.tar"
    optim = {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}
    torch.save(
        {"epoch": 200, "arch": "resnet18", "state_dict": moco, "optimizer": optim}, out["moco"]
    )

    # DINO: teacher and student (DDP) backbones with projection heads, args as a Namespace
    dino = {
        "teacher": {f"backbone.{k}": v for k, v in bb.items()}
        | {"head.mlp.0.weight": torch.randn(64, 512), "head.last_layer.weight_g": torch.ones(9)},
        "student": {f"module.backbone.{k}": v for k, v in _shift(bb, 2.0).items()}
        | {"module.head.mlp.0.weight": torch.randn(64, 512)},
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet18", out_dim=9),
    }
    out["dino"] = root / "dino.pth"
    torch.save(dino, out["dino"])

    out["ema"] = root / "ema.pth"
    torch.save({"state_dict": sd, "state_dict_ema": _shift(sd, 0.5)}, out["ema"])

    out["custom"] = root / "custom.pth"
    torch.save({"state_dict": sd, "extra": Custom()}, out["custom"])

    # what ckptinit writes: metadata with the architecture, headless
    out["own"] = root / "own.safetensors"
    meta = {
        "format": "pt",
        "architecture": "resnet18",
        "num_classes": "0",
        "model_args": repr({"global_pool": "avg"}),
        "ckptinit_version": "0.1.0",
        "method": "between",
        "source": "dino.pth",
    }
    save_file(bb, out["own"], metadata=meta)

    torch.manual_seed(2)
    out["r50"] = root / "r50.safetensors"
    save_file(timm.create_model("resnet50").state_dict(), out["r50"])
    return out
