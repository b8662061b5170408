"""read_info: what a file holds, without building a model."""

from __future__ import annotations

import pytest

from ckptinit.errors import UnsafePickleError
from ckptinit.sources import CheckpointInfo, read_info
from tests.sources.helpers import _backbone


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
