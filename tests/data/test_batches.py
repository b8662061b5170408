"""Calibration batches: a re-iterable stream, exactly the timm eval transform's images,
whatever the batch size, prefetching or worker count; tensors and lists adapt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptinit.data import calibration as calibration_module
from ckptinit.data import load_calibration, samples_dir
from ckptinit.data import read as read_module
from ckptinit.data import transforms as transforms_module
from ckptinit.data.batches import (
    SpoolBatches,
    TensorBatches,
    as_batches,
    count_images,
    first_images,
)
from ckptinit.data.decode import decode
from ckptinit.data.readers import open_source
from ckptinit.data.transforms import PixelNormalizer, Preprocess, resolve_data_config
from tests.data.helpers import SIZE, opts, photo


def test_stream_is_reiterable_and_matches_the_images(model):
    with load_calibration(model, opts(images=20, holdout=3)) as cs:
        batches = cs.batches(8)
        assert isinstance(batches, SpoolBatches)
        assert len(batches) == 3 and batches.num_images == 20 == cs.num_images
        first = list(batches)
        again = list(batches)
        assert [b.shape for b in first] == [(8, 3, SIZE, SIZE)] * 2 + [(4, 3, SIZE, SIZE)]
        assert all(b.dtype == torch.float32 and b.is_contiguous() for b in first)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert torch.equal(torch.cat(first), cs.images)
        serial = SpoolBatches(cs.spool, 8, "cpu", cs.normalizer, prefetch=False)
        assert all(torch.equal(a, b) for a, b in zip(first, serial))
        assert torch.equal(batches[2], first[2]) and torch.equal(batches[-1], first[2])
        with pytest.raises(IndexError):
            batches[3]
        assert torch.equal(batches.first(2), first[0][:2])
        assert torch.equal(first_images(batches), first[0])
        assert torch.equal(batches.first(9), torch.cat([first[0], first[1][:1]]))  # spans
        assert batches.first(99).shape[0] == 20
        with pytest.raises(ValueError):
            batches.first(0)
        assert batches.to("cpu") is batches and count_images(batches) == 20
        # stopping early and iterating again is fine
        for _ in batches:
            break
        assert torch.equal(next(iter(batches)), first[0])
    assert cs.spool.closed and cs.holdout.shape == (3, 3, SIZE, SIZE)


def test_images_are_the_timm_eval_transform_bit_for_bit(model):
    """uint8 records + PixelNormalizer == timm's Resize/CenterCrop/ToTensor/Normalize."""
    options = opts(images=13, holdout=0, workers=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    prep = Preprocess(resolve_data_config(model, options))
    assert prep.record_dtype == np.uint8
    order = [c.payload for c in open_source(options, 13).candidates]
    expected = torch.stack([prep.evaluate(decode(p, prep.mode)) for p in order])
    with load_calibration(model, options) as cs:
        assert cs.spool.dtype == np.uint8
        assert torch.equal(cs.images, expected)


def test_grey_images_and_crops_are_exact_too():
    import timm

    grey = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    options = opts(images=20, holdout=2, mean=(0.5,), std=(0.25,))
    prep = Preprocess(resolve_data_config(grey, options))
    image = decode(samples_dir() / "astronaut.jpg", prep.mode)
    assert torch.equal(prep.to_tensor(prep.record(image)[None])[0], prep.evaluate(image))
    with load_calibration(grey, options) as cs:
        assert cs.images.shape == (20, 1, SIZE, SIZE) and cs.info.augmented > 0
        assert torch.equal(torch.cat(list(cs.batches(7))), cs.images)


def test_float_spool_where_pixels_are_not_exact(model, monkeypatch):
    """A transform with steps the pixel path does not know is stored as float32: same images."""
    with load_calibration(model, opts(images=16, holdout=2)) as exact:
        images, holdout = exact.images, exact.holdout
    monkeypatch.setattr(transforms_module, "PIXEL_STEPS", ())
    with load_calibration(model, opts(images=16, holdout=2)) as cs:
        assert cs.spool.dtype == np.float32
        assert torch.equal(cs.images, images) and torch.equal(cs.holdout, holdout)
        assert torch.equal(torch.cat(list(cs.batches(5))), images)


def test_dropped_payloads_are_read_again_for_crops(model, tmp_path, monkeypatch):
    """In-memory payloads (bytes) are not kept; when crops must be made of them, a fresh,
    identically seeded source gives them back: the same images as keeping them all."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(seed):
        buf = io.BytesIO()
        photo(seed, size=(40, 48)).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    pq.write_table(pa.table({"image": [png(i) for i in range(5)]}), tmp_path / "d.parquet")
    options = opts(data=str(tmp_path / "d.parquet"), images=9, holdout=2)
    refetched = []
    real = calibration_module._refetch
    monkeypatch.setattr(calibration_module, "_refetch",
                        lambda *a: refetched.append(1) or real(*a))
    with load_calibration(model, options) as cs:
        images, holdout, info = cs.images, cs.holdout, cs.info
    assert refetched and info.augmented == 6 and info.distinct_sources == 5
    monkeypatch.setattr(read_module, "cheap", lambda payload: True)  # keep them all
    with load_calibration(model, options) as kept:
        assert torch.equal(kept.images, images) and torch.equal(kept.holdout, holdout)
    assert len(refetched) == 1


def test_tensors_and_lists_adapt():
    x = torch.randn(10, 3, 4, 4)
    batches = as_batches(x, 4, "cpu")
    assert isinstance(batches, TensorBatches) and len(batches) == 3
    parts = list(batches)
    assert [p.shape[0] for p in parts] == [4, 4, 2]
    assert all(p.data_ptr() == x[4 * i].data_ptr() for i, p in enumerate(parts))  # views
    assert torch.equal(batches.first(3), x[:3]) and batches.num_images == 10
    listed = as_batches([x[:6], x[6:]], 99, "cpu")
    assert isinstance(listed, list) and len(listed) == 2
    assert torch.equal(first_images(listed, 2), x[:2]) and count_images(listed) == 10
    assert as_batches(batches, 99, "cpu") is batches
    with pytest.raises(ValueError):
        as_batches(x[0], 4, "cpu")
    with pytest.raises(TypeError):
        as_batches([x, "not a tensor"], 4, "cpu")


def test_normalizer_refuses_floats():
    with pytest.raises(TypeError):
        PixelNormalizer((0.5,), (0.5,))(torch.zeros(1, 1, 2, 2))
