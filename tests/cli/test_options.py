"""Parsing --model-arg and --key-map."""

from __future__ import annotations

import pytest

from ckptinit.cli.options import parse_key_map, parse_model_args
from ckptinit.errors import UsageError


def test_parse_helpers():
    assert parse_model_args(["drop_rate=0.1", "act_layer=gelu", "depths=(1, 2)"]) == {
        "drop_rate": 0.1, "act_layer": "gelu", "depths": (1, 2)}
    assert parse_key_map(["trunk.=", "=backbone.", "a.=b."]) == {
        "trunk.": "", "": "backbone.", "a.": "b."}
    for bad in (["=1"], ["1x=2"], ["novalue"]):
        with pytest.raises(UsageError):
            parse_model_args(bad)
    with pytest.raises(UsageError):
        parse_key_map(["="])
