"""Datasets on disk: parquet repositories and files, save_to_disk folders."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from ckptinit.data import load_calibration
from ckptinit.errors import DataError
from tests.data.helpers import assert_one_line, opts, photo, png_bytes


@pytest.fixture(scope="module")
def parquet_repo(tmp_path_factory) -> Path:
    """A dataset repository as `hf download` leaves it: data/{split}-0000x-of-0000y.parquet."""
    root = tmp_path_factory.mktemp("repo")
    (root / "data").mkdir()
    for split, n, offset in (("train", 10, 0), ("test", 3, 100)):
        rows = {
            "img": [{"bytes": png_bytes(photo(offset + i)), "path": None} for i in range(n)],
            "label": list(range(n)),
        }
        ds = datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image())
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nlicense: cc0-1.0\n---\n")
    return root


def test_parquet_repository(model, parquet_repo):
    a = load_calibration(model, opts(data=str(parquet_repo), images=6, holdout=2))
    b = load_calibration(model, opts(data=str(parquet_repo), images=6, holdout=2, workers=0))
    info = a.info
    assert info.kind == "parquet" and info.split == "train" and info.image_column == "img"
    assert info.available == 10 and info.distinct_sources == 8 and info.augmented == 0
    assert torch.equal(a.images, b.images) and torch.equal(a.holdout, b.holdout)
    c = load_calibration(model, opts(data=str(parquet_repo), images=6, holdout=2, seed=3))
    assert not torch.equal(a.images, c.images)
    test = load_calibration(model, opts(data=str(parquet_repo), split="test", images=4, holdout=0))
    assert test.info.split == "test" and test.info.distinct_sources == 3
    assert test.info.augmented == 1
    with pytest.raises(DataError, match="splits: test, train") as err:
        load_calibration(model, opts(data=str(parquet_repo), split="validation"))
    assert_one_line(err)
    with pytest.raises(DataError, match="columns: img, label"):
        load_calibration(model, opts(data=str(parquet_repo), image_column="photo"))


def test_plain_parquet_file_guesses_column(model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [1, 2, 3], "jpg": [png_bytes(photo(i)) for i in range(3)]})
    pq.write_table(table, tmp_path / "shard.parquet")
    cs = load_calibration(model, opts(data=str(tmp_path / "shard.parquet"), images=3, holdout=0))
    assert cs.info.image_column == "jpg" and cs.info.distinct_sources == 3


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk(model, tmp_path, as_dict):
    rows = {
        "label": list(range(5)),
        "image": [{"bytes": png_bytes(photo(i)), "path": None} for i in range(5)],
    }
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    if as_dict:
        ds = datasets.DatasetDict(train=ds, validation=ds.select(range(2)))
    ds.save_to_disk(str(tmp_path / "saved"))
    split = "validation" if as_dict else None
    cs = load_calibration(model, opts(data=str(tmp_path / "saved"), split=split, images=3,
                                      holdout=1))
    info = cs.info
    assert info.kind == "saved" and info.image_column == "image" and info.split == split
    assert info.available == (2 if as_dict else 5)
    assert info.distinct_sources == (2 if as_dict else 4)
    again = load_calibration(model, opts(data=str(tmp_path / "saved"), split=split, images=3,
                                         holdout=1))
    assert torch.equal(cs.images, again.images)
