"""timm sources: local-dir: and hf-hub: (from a fake cache, and offline)."""

from __future__ import annotations

import time

import pytest
import torch

from ckptinit.errors import SourceError
from ckptinit.options import SourceOptions
from ckptinit.sources import load_source
from tests.sources.helpers import _assert_values, _backbone, _fake_hub_cache


def test_local_dir(ck):
    lm = load_source(f"local-dir:{ck['folder']}")
    assert lm.kind == "local-dir" and lm.architecture == "resnet18" and lm.pretrained
    _assert_values(lm, ck["sd"])
    new_head = load_source(f"local-dir:{ck['folder']}", SourceOptions(num_classes=10))
    assert new_head.missing_keys == ["fc.weight", "fc.bias"]
    assert new_head.model.fc.out_features == 10
    _assert_values(new_head, _backbone(ck["sd"]))


def test_local_dir_under_the_home_folder(ck, monkeypatch):
    monkeypatch.setenv("HOME", str(ck["root"]))
    lm = load_source("local-dir:~/folder")  # timm itself does not expand '~'
    assert lm.path == str(ck["folder"]) and len(lm.loaded_keys) == len(ck["sd"])


def test_local_dir_without_config(tmp_path):
    with pytest.raises(SourceError, match="config.json"):
        load_source(f"local-dir:{tmp_path}")


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
