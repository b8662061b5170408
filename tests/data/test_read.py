"""Reading candidates: alone, and split across ranks (two threads stand in for two torchrun
ranks: their collectives are sums over a barrier), where each rank decodes only what its
`Share` holds yet puts every image at the index one process gives it."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from ckptinit import distributed
from ckptinit.data.read import Share, read_distinct, read_sharded
from ckptinit.data.readers import open_source
from ckptinit.data.transforms import Preprocess, resolve_data_config
from ckptinit.distributed import Ranks
from tests.data.helpers import opts, photo

IMAGES, HOLDOUT, BATCH, WORLD = 20, 3, 4, 2


def two_ranks(monkeypatch) -> threading.local:
    """`distributed` as two ranks in two threads of this process."""
    local, barrier = threading.local(), threading.Barrier(WORLD)
    deposits: list = [None] * WORLD

    def all_reduce_sum_(tensors) -> None:
        deposits[local.rank] = [t.clone() for t in tensors]
        barrier.wait()
        for i, t in enumerate(tensors):
            t.copy_(sum(d[i] for d in deposits))
        barrier.wait()

    monkeypatch.setattr(distributed, "current", lambda: Ranks(local.rank, WORLD))
    monkeypatch.setattr(distributed, "all_reduce_sum_", all_reduce_sum_)
    monkeypatch.setattr(distributed, "together", contextlib.nullcontext)
    return local


def share(rank: int) -> Share:
    return Share(batch_size=BATCH, batches=frozenset(range(rank, 5, WORLD)), prefix=4,
                 images=IMAGES, window=WORLD * BATCH)


@pytest.fixture
def folder(tmp_path):
    """30 photos; the 1st, 6th and 14th in reading order are corrupt."""
    for i in range(30):
        photo(i, size=(40, 36)).save(tmp_path / f"{i:02d}.png")
    options = opts(data=str(tmp_path), images=IMAGES, holdout=HOLDOUT)
    order = [c.label for c in open_source(options, 30).candidates]
    for k in (0, 5, 13):
        (tmp_path / order[k]).write_bytes(b"not an image")
    return options


def test_each_rank_puts_one_process_images_at_its_indices(model, folder, monkeypatch):
    prep = Preprocess(resolve_data_config(model, folder))
    need = IMAGES + HOLDOUT
    one: dict[int, np.ndarray] = {}
    alone = read_distinct(open_source(folder, need), prep, need, 0, lambda d, t: None,
                          one.__setitem__, keep_heavy=IMAGES)
    assert len(one) == need and alone.tried == need + 3

    local = two_ranks(monkeypatch)
    puts: list[dict[int, np.ndarray]] = [{}, {}]
    reads: list = [None, None]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        local.rank = r
        try:
            reads[r] = read_sharded(open_source(folder, need), prep, need, share(r), 0,
                                    lambda d, t: None, puts[r].__setitem__, IMAGES)
        except BaseException as e:  # shown by the assert below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for r in range(WORLD):
        held = [i for i in range(need) if share(r).holds(i)]
        assert list(puts[r]) == held  # in index order, nothing else
        assert all(np.array_equal(puts[r][i], one[i]) for i in held)
        read = reads[r]
        assert read.tried == alone.tried
        assert [c.label for c in read.distinct] == [c.label for c in alone.distinct]
        assert read.skipped == alone.skipped  # labels and reasons (for the notes)
        assert read.decoded < alone.decoded - 5  # the share, not every image
    assert reads[0].labels == reads[1].labels and reads[0].labels
    assert set(puts[0]) | set(puts[1]) == set(range(need))


def test_share_holds_its_batches_the_first_images_and_the_holdout():
    s = share(1)  # batches 1 and 3 of 5
    assert [i for i in range(IMAGES + 2) if s.holds(i)] == [
        0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21]
