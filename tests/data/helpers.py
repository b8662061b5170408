"""Shared by the calibration-data tests: options, small pictures, one-line checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ckptinit.options import CalibrationOptions

SIZE = 32


def opts(**kw) -> CalibrationOptions:
    kw.setdefault("input_size", SIZE)
    return CalibrationOptions(**kw)


def photo(seed: int, size=(48, 40), mode: str = "RGB") -> Image.Image:
    """A smooth random picture (not noise, so that crops differ from the full view)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text
    return text
