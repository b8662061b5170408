"""load_calibration: determinism, crops to fill in, holdout, progress, refusals."""

from __future__ import annotations

import pytest
import torch

from ckptinit.data import CalibrationSet, load_calibration, samples_dir
from ckptinit.errors import DataError, UsageError
from tests.data.helpers import SIZE, assert_one_line, opts


def test_samples_default_deterministic(model):
    a = load_calibration(model, opts())
    b = load_calibration(model, opts(workers=0))  # serial: same tensors as the thread pool
    c = load_calibration(model, opts(seed=1))
    assert isinstance(a, CalibrationSet)
    assert a.images.shape == (64, 3, SIZE, SIZE) and a.images.dtype == torch.float32
    assert a.holdout.shape == (16, 3, SIZE, SIZE)
    assert torch.equal(a.images, b.images) and torch.equal(a.holdout, b.holdout)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.holdout, c.holdout)
    assert torch.isfinite(a.images).all()
    info = a.info
    assert info.kind == "samples" and info.source == "samples"
    assert info.distinct_sources == len(list(samples_dir().glob("*.jpg")))
    assert info.augmented == 64 + 16 - info.distinct_sources
    assert info.holdout_overlaps and info.skipped == 0
    assert any("random crops and flips" in n for n in info.notes)
    assert [b.shape[0] for b in a.batches(24)] == [24, 24, 16]


def test_few_distinct_images_warn_and_enough_do_not(model, tmp_path, caplog):
    """Crops do not make up for distinct images: under MIN_DISTINCT the run says so."""
    from ckptinit.data.calibration import MIN_DISTINCT
    from tests.data.helpers import photo

    few = load_calibration(model, opts())  # the 13 sample photos
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith(
        f"Only {few.info.distinct_sources} distinct calibration images (51 more are crops")
    assert any(n.startswith("only 13 distinct") for n in few.info.notes)
    caplog.clear()
    for i in range(MIN_DISTINCT + 4):
        photo(i).save(tmp_path / f"{i}.png")
    enough = load_calibration(model, opts(data=str(tmp_path), images=MIN_DISTINCT, holdout=4))
    assert enough.info.distinct_sources == MIN_DISTINCT + 4 and enough.info.augmented == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert not any("distinct calibration image" in n for n in enough.info.notes)


def test_more_images_than_files_reports_augmentation(model):
    cs = load_calibration(model, opts(images=20, holdout=0))
    n = cs.info.distinct_sources
    assert cs.images.shape[0] == 20 and cs.holdout.shape[0] == 0
    assert cs.info.augmented == 20 - n
    assert f"{n} distinct calibration images; {20 - n} more made by random crops" in " ".join(
        cs.info.notes
    )
    # crops are new images, not copies of the evaluation view
    for crop in cs.images[n:]:
        assert not any(torch.equal(crop, img) for img in cs.images[:n])


def test_holdout_prefers_unused_distinct_images(model):
    cs = load_calibration(model, opts(images=8, holdout=4))
    assert cs.info.augmented == 0 and not cs.info.holdout_overlaps
    for h in cs.holdout:
        assert not any(torch.equal(h, img) for img in cs.images)
    # 13 photos, 10 + 6 asked: 3 distinct holdout images, 3 crops made of those 3 only
    cs = load_calibration(model, opts(images=10, holdout=6))
    assert cs.info.augmented == 6 - (cs.info.distinct_sources - 10)
    assert not cs.info.holdout_overlaps


def test_progress_reports_every_image(model):
    calls = []
    load_calibration(model, opts(images=20, holdout=4), progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 24) and calls[-1] == (24, 24)
    assert all(t == 24 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_folder_with_only_broken_images(model, tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_calibration(model, opts(data=str(tmp_path)))
    text = assert_one_line(err)
    assert "No usable image" in text and "found 2" in text


def test_bad_options(model):
    with pytest.raises(UsageError):
        load_calibration(model, opts(images=0))
    with pytest.raises(UsageError):
        load_calibration(model, opts(holdout=-1))
