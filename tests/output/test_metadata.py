"""The header schema: one writer, one reader, and its version."""

from __future__ import annotations

import logging

import torch

from ckptinit.data import CalibrationInfo
from ckptinit.output import metadata as md
from ckptinit.output.checkpoint import save_checkpoint
from ckptinit.sources import LoadedModel, read_info


def _header() -> dict[str, str]:
    loaded = LoadedModel(model=torch.nn.Linear(3, 2), architecture="resnet18",
                         source="resnet18", pretrained=False, num_classes=2)
    data = CalibrationInfo(source="samples", kind="samples", resolved="/x/samples",
                           num_images=4, num_holdout=1, distinct_sources=4, augmented=1,
                           skipped=0, seed=0)
    return md.build_header(version="0.1.0", method="none", options={"seed": 0}, seed=0,
                           loaded=loaded, data=data)


def test_writer_numbers_the_schema_and_reader_reads_it(tmp_path, caplog):
    meta = _header()
    assert meta[md.SCHEMA] == str(md.SCHEMA_VERSION) == "1"
    with caplog.at_level(logging.WARNING):
        header = md.read_header(md.with_format(meta))
    assert header.schema == 1 and header.architecture == "resnet18" and header.num_classes == 2
    assert header.provenance[md.SCHEMA] == "1" and header.data()["source"] == "samples"
    assert not caplog.records
    out = save_checkpoint(torch.nn.Linear(3, 2), tmp_path / "m.safetensors", meta)
    info = read_info(out)
    assert info.provenance[md.SCHEMA] == "1" and info.architecture == "resnet18"


def test_header_without_schema_reads_as_before(caplog):
    meta = {k: v for k, v in md.with_format(_header()).items() if k != md.SCHEMA}
    with caplog.at_level(logging.WARNING):
        header = md.read_header(meta)
    assert header.schema is None and header.architecture == "resnet18"
    assert header.provenance[md.VERSION] == "0.1.0"
    assert not caplog.records


def test_newer_schema_is_read_with_one_warning(caplog):
    for value in ("2", "two"):
        caplog.clear()
        meta = md.with_format({**_header(), md.SCHEMA: value})
        with caplog.at_level(logging.WARNING):
            header = md.read_header(meta)
        assert header.architecture == "resnet18" and header.num_classes == 2
        assert len(caplog.records) == 1 and "upgrade ckptinit" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            md.read_header(meta, warn=False)
        assert not caplog.records
