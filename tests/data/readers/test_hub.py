"""Hub dataset ids: offline, invalid ids, streaming (faked), one-line errors."""

from __future__ import annotations

import random
import time

import datasets
import pytest

from ckptinit.data import load_calibration
from ckptinit.data.readers import hub
from ckptinit.errors import DataError
from tests.data.helpers import assert_one_line, opts, photo, png_bytes


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
