"""Checkpoint files: safetensors, pickles, dtypes, and pickles that need trust."""

from __future__ import annotations

import pytest
import torch

from ckptinit.errors import UnsafePickleError
from ckptinit.options import SourceOptions
from ckptinit.sources import load_source
from tests.sources.helpers import _assert_values


def test_plain_safetensors_with_arch(ck):
    lm = load_source(str(ck["plain"]), SourceOptions(arch="resnet18"))
    assert lm.pretrained and lm.kind == "file" and lm.file_format == "safetensors"
    assert lm.arch_from == "option" and lm.missing_keys == [] and lm.dropped_keys == []
    _assert_values(lm, ck["sd"])


def test_torchvision_pth(ck):
    lm = load_source(str(ck["tv"]), SourceOptions(arch="resnet18"))
    assert lm.file_format == "pickle" and lm.stripped_prefixes == [] and lm.nested_key is None
    _assert_values(lm, ck["tv_sd"])


def test_fp16_and_bf16(ck):
    for path, dtype in ((ck["fp16"], torch.float16), (ck["bf16"], torch.bfloat16)):
        lm = load_source(str(path), SourceOptions(arch="resnet18"))
        assert lm.original_tensors["conv1.weight"].dtype == dtype
        assert lm.model.conv1.weight.dtype == torch.float32
        expected = ck["sd"]["conv1.weight"].to(dtype).float()
        assert torch.equal(lm.model.conv1.weight.detach(), expected)
        assert lm.original_tensors["bn1.num_batches_tracked"].dtype == torch.int64


def test_custom_pickle_needs_trust(ck):
    with pytest.raises(UnsafePickleError, match="--trust-pickle") as err:
        load_source(str(ck["custom"]), SourceOptions(arch="resnet18"))
    assert "Custom" in str(err.value) and "\n" not in str(err.value)
    lm = load_source(str(ck["custom"]), SourceOptions(arch="resnet18", trust_pickle=True))
    _assert_values(lm, ck["sd"])
