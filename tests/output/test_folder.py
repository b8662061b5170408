"""The Hub-ready folder: what it holds, timm's config.json, and no half folder ever."""

from __future__ import annotations

import json
import os
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

from ckptinit.errors import OutputError, UsageError
from ckptinit.output import folder as folder_mod
from ckptinit.output.checkpoint import check_output
from ckptinit.output.folder import OWN_FILES, TAG, check_folder, read_folder, write_folder
from tests.output.helpers import make_report

FILES = ["README.md", "change_rates.png", "ckptinit_report.json", "config.json",
         "model.safetensors", "statistics.png"]


def _write(path, *, headless=False, hub=False, **kw):
    model = timm.create_model("test_resnet", num_classes=0 if headless else 10)
    report = make_report(headless=headless, hub=hub)
    write_folder(path, model=model, metadata={"architecture": "test_resnet"}, report=report,
                 **kw)
    return model, report


def test_folder_holds_weights_config_card_report_and_plots(tmp_path):
    out = tmp_path / "r18"
    model, report = _write(out, hub=True, license="mit", repo_id="me/r18")
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert set(FILES) <= OWN_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["r18"]  # no temporary folder left
    weights = load_file(out / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    card = (out / "README.md").read_text()
    assert 'create_model("hf-hub:me/r18"' in card and "license: mit" in card
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert images == ["change_rates.png", "statistics.png"]  # the card shows the plots
    assert all((out / name).is_file() for name in images)
    assert json.loads((out / "ckptinit_report.json").read_text())["method"] == report.method


def test_config_json_is_timms_with_our_tag_and_the_preprocessing_used(tmp_path):
    _write(tmp_path / "a", hub=True, license="mit")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["architecture"] == "test_resnet"
    assert config["num_classes"] == 10 and config["num_features"] == 96
    assert config["global_pool"] == "avg"
    assert config["model_args"]["num_classes"] == 10
    cfg = config["pretrained_cfg"]
    assert cfg["tag"] == TAG and cfg["num_classes"] == 10
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == (
        [3, 64, 64], "bicubic", 0.9, "center")
    assert cfg["mean"] == [0.4] * 3 and cfg["std"] == [0.2] * 3
    assert cfg["license"] == "mit"
    assert "hf_hub_id" not in cfg and "file" not in cfg


def test_headless_config_and_a_fresh_architecture_has_no_inherited_licence(tmp_path):
    report = make_report(headless=True, hub=False)
    report.source["pretrained"] = False
    model = timm.create_model("test_resnet", num_classes=0)
    write_folder(tmp_path / "h", model=model, metadata={}, report=report)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["num_classes"] == 0
    assert "license" not in config["pretrained_cfg"]  # timm's registry licence is not ours
    assert "license:" not in (tmp_path / "h" / "README.md").read_text()
    loaded = timm.create_model(f"local-dir:{tmp_path / 'h'}", pretrained=True)
    assert loaded.num_classes == 0 and loaded.pretrained_cfg["tag"] == TAG


def test_existing_folder_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "m"
    _write(out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="--force"):
        _write(out)
    assert (out / "model.safetensors").read_bytes() == before
    torch.manual_seed(5)
    _write(out, force=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old one is gone


def test_force_never_deletes_files_ckptinit_did_not_write(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"precious")
    with pytest.raises(OutputError, match="cat.jpg"):
        check_folder(mine, force=True)
    assert (mine / "cat.jpg").read_bytes() == b"precious"


@pytest.mark.parametrize("name, match, error", [
    ("x.pth", "rename", UsageError), ("file", "is a file", OutputError),
    ("missing/x", "does not exist", OutputError)])
def test_bad_folder_outputs_are_refused(tmp_path, name, match, error):
    (tmp_path / "file").write_text("x")
    with pytest.raises(error, match=match):
        check_output(tmp_path / name, force=False)


def test_a_failure_leaves_no_half_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ckptinit.output.plots.plot_all", broken)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    _write(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(folder_mod, "render_card", broken)
    with pytest.raises(OSError):
        _write(tmp_path / "old", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_folder_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _write(tmp_path / "u")
    finally:
        os.umask(old)
    assert (tmp_path / "u").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "u" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_read_folder_refuses_what_timm_cannot_load(tmp_path):
    with pytest.raises(OutputError, match="not a folder"):
        read_folder(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="model.safetensors"):
        read_folder(tmp_path)
