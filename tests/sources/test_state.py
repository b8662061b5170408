"""Loading into the model: poor fits refused, timm's filter for resized tensors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from ckptinit.errors import SourceError
from ckptinit.options import SourceOptions
from ckptinit.sources import load_source


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
