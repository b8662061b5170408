"""Shared by the source tests: a pickled class, state dicts, checks, a fake Hub cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import timm
import torch

from ckptinit.sources import LoadedModel


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


def _assert_values(lm: LoadedModel, expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor was loaded into the model and kept as stored."""
    msd = lm.model.state_dict()
    assert lm.loaded_keys == set(expected)
    for k, v in expected.items():
        assert torch.equal(msd[k], v.to(msd[k].dtype)), k
        assert lm.original_tensors[k].dtype == v.dtype
        assert torch.equal(lm.original_tensors[k], v), k


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, Path], sha: str) -> None:
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / sha
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)
    for name, src in files.items():
        shutil.copy(src, snap / name)
