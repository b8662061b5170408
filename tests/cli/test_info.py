"""`ckptinit info`: provenance, JSON, pickles, a missing file."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ckptinit import __version__
from tests.cli.helpers import ARCH, assert_one_line_error, invoke


def test_info_shows_the_provenance(run):
    result = invoke("info", run["out"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("safetensors", ARCH, "ckptinit metadata", "ckptinit provenance",
                     __version__, "within(", "samples", "seed", "format", "pt"):
        assert expected in text, expected
    assert result.stderr == ""

    result = invoke("info", run["out"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "safetensors"
    assert info["architecture"] == ARCH and info["arch_from"] == "metadata"
    assert info["provenance"]["ckptinit_version"] == __version__
    assert info["tensor_count"] == len(load_file(run["out"]))


def test_info_on_a_pickle_and_on_a_missing_file(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)},
                "epoch": 3}, path)
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    assert "pickle" in result.stdout and "unknown" in result.stdout and "epoch" in result.stdout
    assert_one_line_error(invoke("info", tmp_path / "nope.safetensors"))
