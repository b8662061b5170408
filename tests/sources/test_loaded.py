"""What was loaded, as header metadata and as the report's JSON."""

from __future__ import annotations

import json

from ckptinit.options import SourceOptions
from ckptinit.sources import load_source


def test_metadata_and_to_dict(ck):
    lm = load_source(str(ck["moco"]), SourceOptions(arch="resnet18"))
    meta = lm.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["architecture"] == "resnet18" and meta["loaded_tensors"] == "120"
    assert meta["source"] == "checkpoint_0199.pth.tar"
    assert meta["source_nested_key"] == "state_dict"
    assert meta["source_prefix"] == "module.encoder_q."
    assert meta["dropped_count"] == str(len(lm.dropped_keys))
    assert meta["dropped_keys"].count(",") == 20 and meta["dropped_keys"].endswith(",...")
    d = json.loads(json.dumps(lm.to_dict()))
    assert d["loaded_count"] == 120 and d["missing_keys"] == ["fc.weight", "fc.bias"]
    assert len(d["dropped_keys"]) == len(lm.dropped_keys)
