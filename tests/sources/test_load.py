"""SOURCE kinds: timm names, files, folders and typos."""

from __future__ import annotations

import pytest

from ckptinit.errors import SourceError
from ckptinit.options import SourceOptions
from ckptinit.sources import load_source


def test_timm_name_is_fresh():
    lm = load_source("resnet18", SourceOptions(num_classes=0))
    assert not lm.pretrained and lm.architecture == "resnet18" and lm.num_classes == 0
    assert lm.loaded_keys == set() and lm.original_tensors == {}


def test_unknown_name_suggests():
    with pytest.raises(SourceError, match="resnet18"):
        load_source("resnet81")


def test_missing_file_and_folder(ck):
    with pytest.raises(SourceError, match="not found"):
        load_source("/nonexistent/model.safetensors", SourceOptions(arch="resnet18"))
    with pytest.raises(SourceError, match="hf-hub:timm/resnet18"):
        load_source("timm/resnet18")
    with pytest.raises(SourceError, match="local-dir:"):
        load_source(str(ck["folder"]))
