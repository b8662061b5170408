"""Atomic writes: whole or nothing, even on Ctrl-C; the umask's permissions; the suffix kept."""

from __future__ import annotations

import os

import pytest

from ckptinit.output.atomic import TMP_TAG, atomic_path


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_nothing(tmp_path, error):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(f"{TMP_TAG}.json")
        tmp.write_text("half")
        raise error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert target.read_text() == "old"


def test_a_complete_write_replaces_the_target_with_umask_permissions(tmp_path):
    target = tmp_path / "plot.png"
    old = os.umask(0o027)
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"png"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
