"""Decoding: truncated images are skipped and counted."""

from __future__ import annotations

import io

from ckptinit.data import load_calibration
from tests.data.helpers import opts, photo


def test_truncated_image_is_skipped(model, tmp_path):
    good = io.BytesIO()
    photo(1, size=(64, 64)).save(good, "JPEG", quality=95)
    (tmp_path / "ok.jpg").write_bytes(good.getvalue())
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    cs = load_calibration(model, opts(data=str(tmp_path), images=2, holdout=0))
    assert cs.info.distinct_sources == 1 and cs.info.skipped == 1 and cs.info.augmented == 1


def test_tiny_images_and_decompression_bombs_are_skipped_and_counted(model, tmp_path):
    import pytest
    from PIL import Image

    from ckptinit.data.decode import MIN_SIDE, decode
    from tests.cli.test_bad_inputs import _bomb_png

    photo(1, size=(64, 64)).save(tmp_path / "ok.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (MIN_SIDE - 1, 64)).save(tmp_path / "thin.png")
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    for name, reason in (("dot.png", "too small"), ("thin.png", "too small"),
                         ("bomb.png", "decompression bomb")):
        with pytest.raises(Exception, match=reason):
            decode(tmp_path / name, "RGB")
    with pytest.raises(ValueError, match="too small"):
        decode(Image.new("RGB", (2, 2)), "RGB")  # a dataset's PIL image too
    cs = load_calibration(model, opts(data=str(tmp_path), images=2, holdout=0))
    assert cs.info.distinct_sources == 1 and cs.info.skipped == 3
