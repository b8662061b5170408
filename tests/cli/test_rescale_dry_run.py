"""`ckptinit rescale --dry-run`: the plan of every unit in execution order, nothing written."""

from __future__ import annotations

import json

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from tests.cli.helpers import assert_one_line_error, invoke

SMALL = ["--device", "cpu", "--images", "8", "--holdout", "4", "--batch-size", "4"]
VIT = ["--model-arg", "img_size=32", "--input-size", "32"]


def call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Conv/linear modules in the order a forward pass first calls them (own hooks)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order
                                           else None)
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return order


def dry_json(*args) -> dict:
    result = invoke("rescale", *args, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_dry_run_lists_every_unit_in_execution_order_and_writes_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    result = invoke("rescale", "resnet18", "-o", out, "--input-size", "64", "--report",
                    tmp_path / "r.json", "--dry-run", *SMALL)
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []
    order = call_order(timm.create_model("resnet18"), torch.randn(1, 3, 64, 64))
    text = result.stdout
    positions = [text.index(f" {name} ") for name in order]
    assert positions == sorted(positions)
    assert f"would write {out}" in text and f"would write {tmp_path / 'r.json'}" in text
    assert "estimated peak memory" in text and "total" in text

    plan = dry_json("resnet18", "-o", out, "--input-size", "64", *SMALL)
    assert [u["name"] for u in plan["units"]] == order
    assert all(u["draw"] == "gaussian" and u["within"] for u in plan["units"])
    assert plan["data"]["input_size"] == [3, 64, 64] and plan["data"]["batches"] == 2
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_a_vit_balances_q_and_k(tmp_path):
    plan = dry_json("test_vit", "-o", tmp_path / "v.safetensors", *VIT, *SMALL)
    qkv = [u for u in plan["units"] if u["name"].endswith("attn.qkv")]
    assert qkv
    for u in qkv:
        assert [s["status"] for s in u["slices"]] == ["balanced", "balanced", "movable"]
        assert "attention temperature" in u["reason"]
    fc2 = next(u for u in plan["units"] if u["name"].endswith("mlp.fc2"))
    assert "re-normalised" in fc2["reason"]  # a fresh GELU pair moves approximately
    renorm = [p for p in plan["passes"] if p["stage"] == "re-normalise relaxed pairs"]
    assert renorm and renorm[0]["bound"]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_a_loaded_checkpoint_keeps_its_weights_and_names_the_pins(tmp_path):
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    ckpt = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    plan = dry_json(ckpt, "--arch", "test_vit", "--num-classes", "10", "-o",
                    tmp_path / "o.safetensors", *VIT, *SMALL)
    units = {u["name"]: u for u in plan["units"]}
    assert units["head"]["origin"] == "fresh" and units["head"]["within"]
    assert units["head"]["draw"] == "gaussian"
    loaded = [u for n, u in units.items() if n != "head"]
    assert loaded and all(u["draw"] == "kept" and not u["within"] and u["origin"] == "loaded"
                          for u in loaded)
    pinned = [u for u in loaded if u["between"] == "pinned"]
    assert pinned and all(u["reason"] for u in pinned)
    assert any("gelu" in u["reason"] for u in pinned)  # fc1 -> GELU -> fc2 keeps the function
    assert plan["source"]["pretrained"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.safetensors"]


def test_dry_run_pins_a_squeeze_excite_gate(tmp_path):
    plan = dry_json("test_efficientnet", "-o", tmp_path / "e.safetensors", "--input-size",
                    "32", *SMALL)
    gates = [u for u in plan["units"] if u["name"].endswith("se.conv_expand")]
    assert gates and all(u["between"] == "pinned" and "sigmoid" in u["reason"] for u in gates)


def test_dry_run_does_not_refuse_an_existing_output(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    result = invoke("rescale", "test_resnet", "-o", out, "--input-size", "32", "--dry-run",
                    *SMALL)
    assert result.exit_code == 0, result.output
    assert f"would write {out}" in result.stdout
    assert "already exists" in result.stdout  # what the run itself would refuse
    assert out.read_bytes() == b"keep me" and list(tmp_path.iterdir()) == [out]


def test_dry_run_checks_the_source_data_and_options_as_a_run_does(tmp_path):
    out = tmp_path / "o.safetensors"
    assert_one_line_error(invoke("rescale", "no_such_architecture_xyz", "-o", out,
                                 "--dry-run"), 1)
    assert_one_line_error(invoke("rescale", "test_resnet", "-o", out, "--dry-run", "--data",
                                 tmp_path / "missing"), 1, "does not exist")
    assert_one_line_error(invoke("rescale", "test_resnet", "-o", out, "--dry-run",
                                 "--damping", "2"), 2, "--damping")
    assert list(tmp_path.iterdir()) == []


def test_dry_run_is_in_the_help():
    result = invoke("rescale", "--help")
    assert result.exit_code == 0
    assert "--dry-run" in result.stdout and "write nothing" in result.stdout
