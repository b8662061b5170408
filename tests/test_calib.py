"""Calibration data: samples, local folders and datasets, Hub streaming (faked), errors."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ckptinit.data import CalibrationSet, load_calibration, resolve_data_config, samples_dir
from ckptinit.data.readers import hub
from ckptinit.errors import DataError, UsageError
from ckptinit.options import CalibrationOptions

SIZE = 32


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


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


# --------------------------------------------------------------------------- samples


def test_samples_shipped_and_documented():
    folder = samples_dir()
    files = sorted(folder.glob("*.jpg"))
    assert len(files) >= 12
    assert sum(f.stat().st_size for f in files) < 2_000_000
    readme = (folder.parent / "README.md").read_text()
    for f in files:
        assert f"`{f.name}`" in readme, f"{f.name} has no licence entry in samples/README.md"
        with Image.open(f) as im:
            assert max(im.size) <= 512


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


# --------------------------------------------------------------------------- preprocessing


def test_resolve_data_config_overrides(model):
    cfg = resolve_data_config(model, CalibrationOptions())
    assert cfg["input_size"] == (3, 224, 224)
    cfg = resolve_data_config(
        model,
        CalibrationOptions(input_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                           crop_pct=1.0, interpolation="bilinear"),
    )
    assert cfg == {
        "input_size": (3, 48, 48), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25), "crop_pct": 1.0, "crop_mode": "center",
    }
    with pytest.raises(UsageError):
        resolve_data_config(model, CalibrationOptions(interpolation="random"))
    with pytest.raises(UsageError):
        resolve_data_config(model, CalibrationOptions(std=(1.0, 0.0, 1.0)))


def test_grey_model_gets_one_channel():
    grey = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    cs = load_calibration(grey, opts(images=3, holdout=0, mean=(0.5,), std=(0.5,)))
    assert cs.images.shape == (3, 1, SIZE, SIZE)
    with torch.no_grad():
        grey.eval()(cs.images)


# --------------------------------------------------------------------------- local folders


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


def test_truncated_image_is_skipped(model, tmp_path):
    good = io.BytesIO()
    photo(1, size=(64, 64)).save(good, "JPEG", quality=95)
    (tmp_path / "ok.jpg").write_bytes(good.getvalue())
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    cs = load_calibration(model, opts(data=str(tmp_path), images=2, holdout=0))
    assert cs.info.distinct_sources == 1 and cs.info.skipped == 1 and cs.info.augmented == 1


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


def test_folder_with_only_broken_images(model, tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_calibration(model, opts(data=str(tmp_path)))
    text = assert_one_line(err)
    assert "No readable image" in text and "found 2" in text


def test_bad_options(model):
    with pytest.raises(UsageError):
        load_calibration(model, opts(images=0))
    with pytest.raises(UsageError):
        load_calibration(model, opts(holdout=-1))


# --------------------------------------------------------------------------- local datasets


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


# --------------------------------------------------------------------------- Hub


def test_offline_hub_id_fails_fast(model, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not be called offline")

    monkeypatch.setattr(datasets, "load_dataset", never)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_calibration(model, opts(data="imagenet-1k"))
    assert time.perf_counter() - start < 2
    text = assert_one_line(err)
    assert "ILSVRC/imagenet-1k" in text and "offline" in text and "'samples'" in text


def test_invalid_id(model):
    with pytest.raises(DataError, match="neither an existing path nor a valid dataset id"):
        load_calibration(model, opts(data="not a dataset"))


class FakeStream:
    """Stands in for a streaming `datasets.IterableDataset`; records the calls made on it."""

    def __init__(self, rows: list[dict], features, calls: list):
        self.rows, self.features, self.calls = rows, features, calls

    def _derive(self, rows, features=None):
        return FakeStream(rows, features if features is not None else self.features, self.calls)

    def select_columns(self, columns):
        self.calls.append(("select_columns", list(columns)))
        feats = datasets.Features({c: self.features[c] for c in columns})
        return self._derive([{c: r[c] for c in columns} for r in self.rows], feats)

    def decode(self, enable=True):
        self.calls.append(("decode", enable))
        return self

    def shuffle(self, seed=None, buffer_size=1000):
        self.calls.append(("shuffle", seed, buffer_size))
        rows = list(self.rows)
        random.Random(seed).shuffle(rows)
        return self._derive(rows)

    def take(self, n):
        self.calls.append(("take", n))
        return self._derive(self.rows[:n])

    def __iter__(self):
        self.calls.append(("iter",))
        return iter(self.rows)


@pytest.fixture
def fake_hub(monkeypatch):
    """Patch the Hub: online, a pinned sha, and `datasets.load_dataset` -> FakeStream."""
    state = {"calls": [], "loads": [], "rows": [], "features": None, "raise": None}

    def load_dataset(path, **kwargs):
        state["loads"].append((path, kwargs))
        if state["raise"] is not None:
            raise state["raise"]
        return FakeStream(state["rows"], state["features"], state["calls"])

    monkeypatch.setattr(hub, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub, "dataset_revision", lambda repo, rev, token: "0123abcd")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return state


def test_hub_stream_shuffles_before_take(model, fake_hub):
    fake_hub["rows"] = [
        {"label": i, "image": {"bytes": png_bytes(photo(i)), "path": f"{i}.png"}}
        for i in range(30)
    ]
    fake_hub["features"] = datasets.Features(
        {"label": datasets.Value("int64"), "image": datasets.Image()}
    )
    cs = load_calibration(model, opts(data="imagenet-1k", images=6, holdout=2, seed=5,
                                      shuffle_buffer=50, token="hf_x"))
    (path, kwargs), = fake_hub["loads"]
    assert path == "ILSVRC/imagenet-1k"
    assert kwargs["streaming"] is True and kwargs["split"] == "train"
    assert kwargs["revision"] == "0123abcd" and kwargs["token"] == "hf_x"
    names = [c[0] for c in fake_hub["calls"]]
    assert names.index("shuffle") < names.index("take") < names.index("iter")
    assert ("shuffle", 5, 50) in fake_hub["calls"] and ("take", 8) in fake_hub["calls"]
    assert ("select_columns", ["image"]) in fake_hub["calls"]
    info = cs.info
    assert info.kind == "hub" and info.resolved == "ILSVRC/imagenet-1k"
    assert info.image_column == "image" and info.shuffle_buffer == 50
    assert info.revision == "0123abcd" and info.distinct_sources == 8
    assert any("'imagenet-1k' is the Hub dataset 'ILSVRC/imagenet-1k'" in n for n in info.notes)
    assert cs.info.metadata()["data_resolved"] == "ILSVRC/imagenet-1k"


def test_hub_image_column_from_first_example(model, fake_hub):
    fake_hub["rows"] = [{"txt": "a cat", "jpg": {"bytes": png_bytes(photo(i))}} for i in range(4)]
    cs = load_calibration(model, opts(data="someone/webdata", images=3, holdout=0))
    assert cs.info.image_column == "jpg" and cs.info.distinct_sources == 3


def test_hub_without_image_column(model, fake_hub):
    fake_hub["rows"] = [{"text": "hello", "label": 1}]
    fake_hub["features"] = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    with pytest.raises(DataError, match="columns: text, label") as err:
        load_calibration(model, opts(data="someone/text-only", images=2, holdout=0))
    assert_one_line(err)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (datasets.exceptions.DatasetNotFoundError(
            "Dataset 'org/gated' is a gated dataset on the Hub. Visit the dataset page."),
         "hf auth login"),
        (datasets.exceptions.DatasetNotFoundError("Dataset 'org/gated' doesn't exist on the Hub"),
         "not found on the Hugging Face Hub"),
        (ValueError("Bad split: train. Available splits: ['test', 'validation']"),
         "splits: ['test', 'validation']"),
        (ConnectionError("Couldn't reach 'org/gated' on the Hub (ConnectTimeout)"),
         "Cannot reach the Hugging Face Hub"),
    ],
)
def test_hub_load_errors_are_one_line(model, fake_hub, error, expected):
    fake_hub["raise"] = error
    with pytest.raises(DataError) as err:
        load_calibration(model, opts(data="org/gated"))
    assert expected in assert_one_line(err)


def test_hub_preflight_errors(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    def raising(cls, message):
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        return err

    cases = [
        (raising(hf_errors.GatedRepoError, "gated"), "request access"),
        (raising(hf_errors.RepositoryNotFoundError, "404"), "not found"),
        (raising(hf_errors.RevisionNotFoundError, "404"), "Revision 'v9' not found"),
        (OSError("Name or service not known"), "Cannot reach the Hugging Face Hub"),
    ]
    for error, expected in cases:
        def info(self, *args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(HfApi, "dataset_info", info)
        with pytest.raises(DataError) as err:
            hub.dataset_revision("org/name", "v9", None)
        assert expected in assert_one_line(err)
