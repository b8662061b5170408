"""`rescale -o FOLDER`: a folder timm loads as local-dir: with the outputs of its weights,
headless and from a checkpoint too, and that ckptinit takes back as a source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from ckptinit.output.folder import TAG
from tests.cli.helpers import ARCH, TINY, assert_one_line_error, invoke

SECRET = "hf_secret_never_written"


def _same_as_its_weights(folder: Path, num_classes: int) -> timm.models.ResNet:
    """timm's local-dir: loader gives the outputs of model.safetensors in the architecture."""
    config = json.loads((folder / "config.json").read_text())
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_hand = timm.create_model(config["architecture"], pretrained=False,
                                num_classes=num_classes)
    by_hand.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    by_hand.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = via_timm(x)
        assert torch.equal(out, by_hand(x))
    assert out.shape == (3, num_classes if num_classes else via_timm.num_features)
    return via_timm


@pytest.fixture(scope="module")
def headless(tmp_path_factory) -> dict:
    """A fresh architecture, headless, written as a folder (with a token given)."""
    out = tmp_path_factory.mktemp("folders") / "headless"
    result = invoke("rescale", ARCH, "--num-classes", "0", "-o", out, "--license", "mit",
                    "--token", SECRET, *TINY)
    assert result.exit_code == 0, result.output
    return {"out": out, "result": result}


def test_headless_folder_loads_through_timm(headless):
    out = headless["out"]
    assert headless["result"].stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "change_rates.png", "ckptinit_report.json", "config.json",
        "model.safetensors", "statistics.png"]
    model = _same_as_its_weights(out, num_classes=0)
    assert model.pretrained_cfg["tag"] == TAG
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["input_size"] == (3, 32, 32)  # what the calibration used, not the default
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["pipeline_tag"] == "image-feature-extraction" and meta["license"] == "mit"


def test_card_and_report_record_the_command_but_never_the_token(headless):
    out = headless["out"]
    report = json.loads((out / "ckptinit_report.json").read_text())
    expected = ("ckptinit rescale test_resnet --num-classes 0 --images 8 --holdout 4 "
                "--input-size 32 --grad-batches 1 --device cpu --batch-size 8 --output "
                "headless --license mit")
    assert report["command_line"] == expected
    assert f"```bash\n{expected}\n```" in (out / "README.md").read_text()
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path.name
    assert SECRET not in headless["result"].output


def test_folder_from_a_checkpoint_with_a_new_head(run, tmp_path):
    out = tmp_path / "ft"
    result = invoke("rescale", run["out"], "--num-classes", "10", "-o", out, "-q", *TINY)
    assert result.exit_code == 0, result.output
    _same_as_its_weights(out, num_classes=10)
    report = json.loads((out / "ckptinit_report.json").read_text())
    assert report["source"]["path"] == Path(run["out"]).name  # no local path published
    assert str(run["out"].parent) not in (out / "README.md").read_text()
    # ckptinit takes its own folder back as a source
    again = tmp_path / "again.safetensors"
    result = invoke("rescale", f"local-dir:{out}", "-o", again, "--report",
                    tmp_path / "again.json", "-q", *TINY)
    assert result.exit_code == 0, result.output
    source = json.loads((tmp_path / "again.json").read_text())["source"]
    assert source["kind"] == "local-dir" and source["architecture"] == ARCH
    assert source["missing_count"] == 0 and source["loaded_count"] == len(load_file(again))


@pytest.mark.parametrize("args, code, contains", [
    (["-o", "{tmp}/x.safetensors", "--push-to", "me/x"], 2, "-o FOLDER"),
    (["-o", "{tmp}/x.safetensors", "--license", "mit"], 2, "-o FOLDER"),
    (["-o", "{tmp}/f", "--license", "my licence"], 2, "licence id"),
    (["-o", "{tmp}/f", "--private"], 2, "--push-to"),
    (["-o", "{tmp}/x.pth"], 2, "folder"),  # a usage error, like --report r.txt
    (["-o", "{tmp}/taken"], 1, "--force"),
])
def test_bad_folder_options_are_refused_before_any_work(tmp_path, args, code, contains):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_error(invoke("rescale", ARCH, *TINY, *args), code, contains)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["config.json"]
