"""The old flat module paths stay importable until 0.3, as aliases of the new ones."""

from __future__ import annotations

import importlib

import pytest

OLD_TO_NEW = {
    "calib": "ckptinit.data",
    "source": "ckptinit.sources",
    "units": "ckptinit.method.units",
    "within": "ckptinit.method.within",
    "between": "ckptinit.method.between",
    "draws": "ckptinit.method.draws",
    "stats": "ckptinit.method.stats",
    "checkpoint": "ckptinit.output.checkpoint",
    "console": "ckptinit.cli.render",
}


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_old_paths_are_aliases(old):
    mod = importlib.import_module(f"ckptinit.{old}")
    assert "removed in 0.3" in mod.__doc__
    assert mod.__all__ and all(hasattr(mod, name) for name in mod.__all__)
    new = importlib.import_module(OLD_TO_NEW[old])
    shared = [name for name in mod.__all__ if hasattr(new, name)]
    assert shared and all(getattr(mod, name) is getattr(new, name) for name in shared)
