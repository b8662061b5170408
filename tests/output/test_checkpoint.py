"""Writing checkpoints: atomic, no overwrite by accident, shared storage, same bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptinit.errors import OutputError
from ckptinit.output.checkpoint import save_checkpoint


def test_writer_is_atomic_and_refuses_overwrite(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    out = tmp_path / "m.safetensors"
    save_checkpoint(model, out, {"a": "b"})
    before = out.read_bytes()
    with pytest.raises(OutputError, match="--force"):
        save_checkpoint(model, out, {})
    assert out.read_bytes() == before

    import safetensors.torch as st

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(model, tmp_path / "new.safetensors", {})
    assert not (tmp_path / "new.safetensors").exists()
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_shared_storage_is_deduplicated(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

    out = save_checkpoint(Tied(), tmp_path / "t.safetensors", {})
    saved = load_file(out)
    assert torch.equal(saved["a.weight"], saved["b.weight"])


def test_same_input_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    meta = {f"key{i}": f"value{i}" for i in range(40)}  # enough keys to expose hash order
    a = save_checkpoint(model, tmp_path / "a.safetensors", meta)
    b = save_checkpoint(model, tmp_path / "b.safetensors", dict(reversed(meta.items())))
    assert a.read_bytes() == b.read_bytes()
    assert safe_open(str(a), "pt").metadata()["key7"] == "value7"
    assert torch.equal(load_file(a)["0.weight"], model[0].weight)


def test_a_float16_value_out_of_range_is_refused_not_written(tmp_path):
    model = torch.nn.Linear(3, 2)
    originals = {k: v.detach().half() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight[0, 0] = 1e6  # finite in float32, Inf once written back as float16
    with pytest.raises(OutputError, match=r"weight \(float16: 1 Inf\)"):
        save_checkpoint(model, tmp_path / "m.safetensors", {}, originals=originals)
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_an_input_is_refused(tmp_path):
    from ckptinit.errors import UsageError
    from ckptinit.output.checkpoint import check_output

    src = tmp_path / "in.safetensors"
    src.write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(src)
    for out in (src, tmp_path / "link.safetensors"):
        with pytest.raises(UsageError, match="is the input"):
            check_output(out, force=True, inputs=[src])
    assert check_output(tmp_path / "new.safetensors", force=False, inputs=[src])
