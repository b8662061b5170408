"""Image files: the samples, folders (formats, links, splits), one image, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ckptinit.data import load_calibration, samples_dir
from ckptinit.errors import DataError
from tests.data.helpers import SIZE, assert_one_line, opts, photo


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Nested class folders, mixed formats and modes, one corrupt file, some noise."""
    root = tmp_path_factory.mktemp("images")
    (root / "cats").mkdir()
    (root / "dogs" / "small").mkdir(parents=True)
    (root / ".hidden").mkdir()
    photo(1).save(root / "cats" / "a.png")
    photo(2).save(root / "cats" / "b.JPG", "JPEG", quality=90)
    photo(3).save(root / "dogs" / "c.webp", "WEBP")
    photo(4, mode="L").save(root / "dogs" / "grey.png")
    photo(5, mode="RGBA").save(root / "dogs" / "small" / "alpha.png")
    photo(6, mode="CMYK").save(root / "dogs" / "small" / "cmyk.jpg", "JPEG")
    photo(7).convert("P").save(root / "cats" / "palette.gif")
    deep = (np.asarray(photo(9, mode="L"), dtype=np.uint16) * 64).astype(np.uint16)
    Image.fromarray(deep).save(root / "dogs" / "deep16.tif")  # 16-bit grey TIFF
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    photo(8).save(root / ".hidden" / "x.png")  # hidden folders are ignored
    return root


def test_samples_shipped_and_documented():
    folder = samples_dir()
    files = sorted(folder.glob("*.jpg"))
    assert len(files) >= 12
    assert sum(f.stat().st_size for f in files) < 2_000_000
    readme = (folder / "README.md").read_text()
    for f in files:
        assert f"`{f.name}`" in readme, f"{f.name} has no licence entry in its README.md"
        with Image.open(f) as im:
            assert max(im.size) <= 512


def test_image_folder_formats_and_corrupt_file(model, image_folder):
    # 9 asked, 8 readable: every file is tried, so the corrupt one is always met
    cs = load_calibration(model, opts(data=str(image_folder), images=7, holdout=2, workers=2))
    info = cs.info
    assert info.kind == "folder" and info.resolved == str(image_folder.resolve())
    assert info.available == 9  # 8 readable images + 1 corrupt; txt and hidden ignored
    assert info.distinct_sources == 8 and info.skipped == 1 and info.augmented == 1
    assert any("cats/broken.jpg" in n for n in info.notes)
    assert cs.images.shape == (7, 3, SIZE, SIZE) and cs.holdout.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(cs.images).all()
    serial = load_calibration(model, opts(data=str(image_folder), images=7, holdout=2, workers=0))
    assert torch.equal(cs.images, serial.images) and torch.equal(cs.holdout, serial.holdout)
    meta = info.metadata()
    assert meta["data_resolved"] == image_folder.name  # no absolute paths in checkpoints
    assert meta["data_skipped"] == "1" and all(k.startswith("data_") for k in meta)
    assert all(isinstance(v, str) for v in meta.values())
    json.dumps(info.to_dict())


def test_symlinked_folders_followed_once(model, tmp_path):
    (tmp_path / "real").mkdir()
    photo(1).save(tmp_path / "real" / "x.png")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "loop").symlink_to(tmp_path, target_is_directory=True)
    cs = load_calibration(model, opts(data=str(tmp_path), images=1, holdout=0))
    assert cs.info.available == 1 and cs.info.distinct_sources == 1


def test_single_image_file(model, image_folder):
    cs = load_calibration(model, opts(data=str(image_folder / "cats" / "a.png"), images=3,
                                      holdout=1))
    assert cs.info.kind == "image" and cs.info.distinct_sources == 1
    assert cs.info.augmented == 3 and cs.info.holdout_overlaps


def test_image_folder_split_subfolder(model, tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cls").mkdir(parents=True)
        photo(len(split)).save(tmp_path / split / "cls" / "x.png")
    cs = load_calibration(model, opts(data=str(tmp_path), split="val", images=1, holdout=0))
    assert cs.info.resolved == str((tmp_path / "val").resolve())
    with pytest.raises(DataError, match="splits found: train, val") as err:
        load_calibration(model, opts(data=str(tmp_path), split="test", images=1, holdout=0))
    assert_one_line(err)


def test_missing_folder(model):
    with pytest.raises(DataError) as err:
        load_calibration(model, opts(data="./no/such/folder"))
    assert "does not exist" in assert_one_line(err) and "'samples'" in str(err.value)


def test_folder_without_images(model, tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError) as err:
        load_calibration(model, opts(data=str(tmp_path)))
    assert str(tmp_path) in assert_one_line(err)
