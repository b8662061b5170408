"""What a file is, from its bytes; safetensors headers checked against the file's size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ckptinit.errors import SourceError
from ckptinit.sources import read_info
from ckptinit.sources.sniff import check_safetensors_header, sniff


def test_checkpoints_are_told_by_content_not_by_name(tmp_path):
    tensors = {"w": torch.ones(2, 3)}
    save_file(tensors, tmp_path / "model.pth")  # safetensors under a pickle's name
    torch.save(tensors, tmp_path / "a.safetensors.bak")
    torch.save(tensors, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert sniff(tmp_path / "model.pth") == "safetensors"
    assert sniff(tmp_path / "a.safetensors.bak") == "zip"
    assert sniff(tmp_path / "legacy.bin") == "pickle"
    check_safetensors_header(tmp_path / "model.pth")  # a sound header passes
    assert read_info(tmp_path / "model.pth").format == "safetensors"


@pytest.mark.parametrize("data, named", [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "Git LFS pointer"),
    (b'{"architecture": "resnet18"}', "JSON file"),
    (b"\x1f\x8b\x08\x00rest", "gzip"),
    (b"\x93NUMPY\x01\x00", "NumPy"),
    (bytes(range(7, 200)), "no known format"),
])
def test_other_files_are_named_in_one_line(tmp_path, data, named):
    path = tmp_path / "weights.pth"
    path.write_bytes(data)
    with pytest.raises(SourceError, match=named) as err:
        read_info(path)
    assert "\n" not in str(err.value) and "--trust-pickle" not in str(err.value)


def test_info_names_a_truncated_safetensors_file(tmp_path):
    save_file({"w": torch.ones(64, 64)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(SourceError, match="truncated: its header describes 16,384 bytes"):
        read_info(tmp_path / "cut.safetensors")
