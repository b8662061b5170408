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
