"""Test setup: offline, deterministic, small."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Image-like tensors (spatially correlated, normalised), cheap to make."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                        align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return (x - x.mean()) / x.std()


@pytest.fixture
def images():
    return smooth_images
