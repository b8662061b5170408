"""Model sources: timm names, files in the layouts found in the wild, local-dir and hf-hub."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ckptinit.errors import SourceError, UnsafePickleError
from ckptinit.options import SourceOptions
from ckptinit.sources import CheckpointInfo, LoadedModel, load_source, read_info


class Custom:
    """Something weights_only refuses to unpickle."""

    def __init__(self, value: int = 3) -> None:
        self.value = value


def _r18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in timm.create_model("resnet18").state_dict().items()}


def _backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _shift(sd: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by if v.is_floating_point() else v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> dict:
    """Every checkpoint layout, built once for the module (resnet18; one resnet50)."""
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


def _assert_values(lm: LoadedModel, expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor was loaded into the model and kept as stored."""
    msd = lm.model.state_dict()
    assert lm.loaded_keys == set(expected)
    for k, v in expected.items():
        assert torch.equal(msd[k], v.to(msd[k].dtype)), k
        assert lm.original_tensors[k].dtype == v.dtype
        assert torch.equal(lm.original_tensors[k], v), k


# --------------------------------------------------------------------------- names


def test_timm_name_is_fresh():
    lm = load_source("resnet18", SourceOptions(num_classes=0))
    assert not lm.pretrained and lm.architecture == "resnet18" and lm.num_classes == 0
    assert lm.loaded_keys == set() and lm.original_tensors == {}


def test_unknown_name_suggests():
    with pytest.raises(SourceError, match="resnet18"):
        load_source("resnet81")


# --------------------------------------------------------------------------- files


def test_plain_safetensors_with_arch(ck):
    lm = load_source(str(ck["plain"]), SourceOptions(arch="resnet18"))
    assert lm.pretrained and lm.kind == "file" and lm.file_format == "safetensors"
    assert lm.arch_from == "option" and lm.missing_keys == [] and lm.dropped_keys == []
    _assert_values(lm, ck["sd"])


def test_missing_arch_asks_for_it(ck):
    with pytest.raises(SourceError, match="--arch"):
        load_source(str(ck["plain"]))


def test_config_json_beside(ck):
    lm = load_source(str(ck["folder"] / "model.safetensors"))
    assert lm.arch_from == "config.json" and lm.architecture == "resnet18"
    assert lm.model.pretrained_cfg["crop_pct"] == 0.95  # the config's preprocessing is kept
    _assert_values(lm, ck["sd"])


def test_torchvision_pth(ck):
    lm = load_source(str(ck["tv"]), SourceOptions(arch="resnet18"))
    assert lm.file_format == "pickle" and lm.stripped_prefixes == [] and lm.nested_key is None
    _assert_values(lm, ck["tv_sd"])


def test_moco_v2(ck):
    lm = load_source(str(ck["moco"]))  # the architecture comes from the checkpoint's "arch"
    assert lm.arch_from == "checkpoint" and lm.architecture == "resnet18"
    assert lm.nested_key == "state_dict" and lm.stripped_prefixes == ["module.encoder_q."]
    _assert_values(lm, _backbone(ck["sd"]))
    assert lm.missing_keys == ["fc.weight", "fc.bias"]
    for k in ("module.queue", "module.queue_ptr", "module.encoder_q.fc.0.weight"):
        assert k in lm.dropped_keys
    assert "module.encoder_k.conv1.weight" in lm.dropped_keys
    assert not any(k.startswith("module.encoder_q.layer") for k in lm.dropped_keys)


def test_moco_strip_prefix_override(ck):
    opts = SourceOptions(arch="resnet18", strip_prefix=["module.encoder_k."])
    lm = load_source(str(ck["moco"]), opts)
    _assert_values(lm, _shift(_backbone(ck["sd"]), 1.0))


def test_key_map_renames_after_stripping(ck, tmp_path):
    renamed = {f"model.trunk_{k}": v for k, v in _backbone(ck["sd"]).items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    opts = SourceOptions(arch="resnet18", strip_prefix=["model."], key_map={"trunk_": ""})
    lm = load_source(str(tmp_path / "renamed.pt"), opts)
    _assert_values(lm, _backbone(ck["sd"]))
    assert lm.metadata()["source_key_map"] == "trunk_="


def test_dino_prefers_teacher(ck):
    lm = load_source(str(ck["dino"]), SourceOptions(arch="resnet18"))
    assert lm.nested_key == "teacher" and lm.stripped_prefixes == ["backbone."]
    _assert_values(lm, _backbone(ck["sd"]))
    assert lm.missing_keys == ["fc.weight", "fc.bias"]
    assert set(lm.dropped_keys) == {"head.mlp.0.weight", "head.last_layer.weight_g"}


def test_dino_headless(ck):
    lm = load_source(str(ck["dino"]), SourceOptions(num_classes=0))  # arch from args.arch
    assert lm.arch_from == "checkpoint" and lm.num_classes == 0 and lm.missing_keys == []
    assert lm.model.get_classifier().__class__.__name__ == "Identity"


def test_ema_choice(ck):
    plain = load_source(str(ck["ema"]), SourceOptions(arch="resnet18"))
    assert plain.nested_key == "state_dict"
    _assert_values(plain, ck["sd"])
    ema = load_source(str(ck["ema"]), SourceOptions(arch="resnet18", use_ema=True))
    assert ema.nested_key == "state_dict_ema"
    _assert_values(ema, _shift(ck["sd"], 0.5))


def test_fp16_and_bf16(ck):
    for path, dtype in ((ck["fp16"], torch.float16), (ck["bf16"], torch.bfloat16)):
        lm = load_source(str(path), SourceOptions(arch="resnet18"))
        assert lm.original_tensors["conv1.weight"].dtype == dtype
        assert lm.model.conv1.weight.dtype == torch.float32
        expected = ck["sd"]["conv1.weight"].to(dtype).float()
        assert torch.equal(lm.model.conv1.weight.detach(), expected)
        assert lm.original_tensors["bn1.num_batches_tracked"].dtype == torch.int64


def test_num_classes_changes_head(ck):
    lm = load_source(str(ck["plain"]), SourceOptions(arch="resnet18", num_classes=10))
    assert lm.num_classes == 10 and lm.missing_keys == ["fc.weight", "fc.bias"]
    assert {"fc.weight", "fc.bias"} <= set(lm.dropped_keys)
    assert lm.shape_mismatches["fc.weight"] == ((1000, 512), (10, 512))
    assert any("--num-classes 1000" in n for n in lm.notes)


def test_own_metadata_gives_arch(ck):
    lm = load_source(str(ck["own"]))
    assert lm.arch_from == "metadata" and lm.num_classes == 0
    assert lm.model_args == {"global_pool": "avg"}
    _assert_values(lm, _backbone(ck["sd"]))


def test_custom_pickle_needs_trust(ck):
    with pytest.raises(UnsafePickleError, match="--trust-pickle") as err:
        load_source(str(ck["custom"]), SourceOptions(arch="resnet18"))
    assert "Custom" in str(err.value) and "\n" not in str(err.value)
    lm = load_source(str(ck["custom"]), SourceOptions(arch="resnet18", trust_pickle=True))
    _assert_values(lm, ck["sd"])


def test_wrong_arch_is_refused(ck):
    with pytest.raises(SourceError) as err:
        load_source(str(ck["r50"]), SourceOptions(arch="resnet18"))
    msg = str(err.value)
    assert "check --arch" in msg and "resnet18" in msg and "of its 60 weight tensors" in msg
    assert "checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in msg


def test_unrelated_keys_are_refused(ck, tmp_path):
    save_file({"foo.bar": torch.zeros(3)}, tmp_path / "x.safetensors")
    with pytest.raises(SourceError, match="0 of its 60 .*--strip-prefix.*check --arch"):
        load_source(str(tmp_path / "x.safetensors"), SourceOptions(arch="resnet18"))


def test_missing_file_and_folder(ck):
    with pytest.raises(SourceError, match="not found"):
        load_source("/nonexistent/model.safetensors", SourceOptions(arch="resnet18"))
    with pytest.raises(SourceError, match="hf-hub:timm/resnet18"):
        load_source("timm/resnet18")
    with pytest.raises(SourceError, match="local-dir:"):
        load_source(str(ck["folder"]))


def test_metadata_and_to_dict(ck):
    lm = load_source(str(ck["moco"]), SourceOptions(arch="resnet18"))
    meta = lm.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["architecture"] == "resnet18" and meta["loaded_tensors"] == "120"
    assert meta["source"] == "checkpoint_0199.pth.tar"
    assert meta["source_nested_key"] == "state_dict"
    assert meta["source_prefix"] == "module.encoder_q."
    assert meta["dropped_count"] == str(len(lm.dropped_keys))
    assert meta["dropped_keys"].count(",") == 20 and meta["dropped_keys"].endswith(",...")
    d = json.loads(json.dumps(lm.to_dict()))
    assert d["loaded_count"] == 120 and d["missing_keys"] == ["fc.weight", "fc.bias"]
    assert len(d["dropped_keys"]) == len(lm.dropped_keys)


# --------------------------------------------------------------------------- timm sources


def test_local_dir(ck):
    lm = load_source(f"local-dir:{ck['folder']}")
    assert lm.kind == "local-dir" and lm.architecture == "resnet18" and lm.pretrained
    _assert_values(lm, ck["sd"])
    new_head = load_source(f"local-dir:{ck['folder']}", SourceOptions(num_classes=10))
    assert new_head.missing_keys == ["fc.weight", "fc.bias"]
    assert new_head.model.fc.out_features == 10
    _assert_values(new_head, _backbone(ck["sd"]))


def test_local_dir_without_config(tmp_path):
    with pytest.raises(SourceError, match="config.json"):
        load_source(f"local-dir:{tmp_path}")


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, Path], sha: str) -> None:
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / sha
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)
    for name, src in files.items():
        shutil.copy(src, snap / name)


def test_hf_hub_from_cache(ck, tmp_path, monkeypatch):
    import huggingface_hub.constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    files = {"config.json": ck["folder"] / "config.json", "model.safetensors": ck["fp16"]}
    _fake_hub_cache(tmp_path, "me/r18", files, sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    lm = load_source("hf-hub:me/r18")
    assert lm.kind == "hf-hub" and lm.repo_id == "me/r18" and lm.revision == sha
    assert lm.metadata()["source_revision"] == sha
    assert lm.original_tensors["conv1.weight"].dtype == torch.float16
    assert len(lm.loaded_keys) == len(ck["sd"]) and lm.missing_keys == []


def test_hf_hub_offline_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(SourceError, match="timm/resnet18.a1_in1k") as err:
        load_source("hf-hub:timm/resnet18.a1_in1k")
    assert time.monotonic() - start < 5 and "\n" not in str(err.value)


# --------------------------------------------------------------------------- info


def test_read_info_safetensors(ck):
    info = read_info(ck["own"])
    assert isinstance(info, CheckpointInfo) and info.format == "safetensors"
    assert info.tensor_count == 120 and info.dtypes == {"float32": 100, "int64": 20}
    assert info.parameter_count == sum(v.numel() for v in _backbone(ck["sd"]).values())
    assert info.architecture == "resnet18" and info.arch_from == "metadata"
    assert info.num_classes == 0 and info.model_args == {"global_pool": "avg"}
    assert info.provenance["ckptinit_version"] == "0.1.0" and "architecture" not in info.provenance
    assert info.metadata["format"] == "pt"


def test_read_info_pickle(ck):
    info = read_info(ck["dino"])
    assert info.format == "pickle" and info.sections == {"teacher": 122, "student": 121}
    assert info.metadata["epoch"] == "100" and info.provenance == {}
    assert info.architecture == "resnet18" and info.arch_from == "checkpoint"
    plain = read_info(ck["plain"])
    assert plain.architecture is None and plain.provenance == {}
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        read_info(ck["custom"])
    assert read_info(ck["custom"], trust_pickle=True).tensor_count == len(ck["sd"])


def test_vit_pos_embed_resized_by_timm_filter(tmp_path):
    """Another image size: timm's filter resamples pos_embed; the rest stays as stored."""
    sd = timm.create_model("test_vit").state_dict()
    torch.save({"model": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "vit.pth")
    opts = SourceOptions(arch="test_vit", model_args={"img_size": 96})
    lm = load_source(str(tmp_path / "vit.pth"), opts)
    assert lm.loaded_keys == set(sd) and lm.missing_keys == [] and lm.dropped_keys == []
    assert "pos_embed" not in lm.original_tensors and lm.shape_mismatches == {}
    assert lm.model.pos_embed.shape[1] == 37 and any("pos_embed" in n for n in lm.notes)
    assert torch.equal(lm.model.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
