"""method/dry_run.py: the plan leaves the model as found and predicts the draws' fallbacks."""

from __future__ import annotations

import copy

import timm
import torch

from ckptinit.method.dry_run import dry_run
from ckptinit.options import RescaleOptions


def test_dry_run_leaves_the_model_as_found():
    model = timm.create_model("test_resnet", pretrained=False)
    model.fc.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    plan = dry_run(model, (3, 32, 32), RescaleOptions(), images=8, holdout=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert not model.fc.weight.requires_grad and model.conv1[0].weight.requires_grad
    # zero-started branches get a share in the plan, as in the run, but not in the model
    assert any("residual branches" in n for n in plan.notes)
    assert plan.memory["peak_bytes"] > plan.memory["parameter_bytes"]


def test_a_patch_draw_with_too_few_rows_is_reported_as_its_fallback():
    model = timm.create_model("test_resnet", pretrained=False)
    plan = dry_run(model, (3, 32, 32), RescaleOptions(weights="pca", within=True,
                                                      batch_size=1), images=1, holdout=0)
    fc = next(u for u in plan.units if u.name == "fc")  # 1 row per image, 1000 outputs
    assert fc.draw == "pca" and "falls back to gaussian" in fc.draw_note
    conv = next(u for u in plan.units if u.name == "conv1.0")  # 256 rows, 16 outputs
    assert conv.draw_note is None


def test_steps_switched_off_are_planned_as_off():
    model = timm.create_model("test_resnet", pretrained=False)
    plan = dry_run(model, (3, 32, 32), RescaleOptions(within=False, between=False),
                   images=8, holdout=0)
    assert all(u.draw == "timm init" and not u.within and u.between == "off"
               for u in plan.units)
    assert [p.stage for p in plan.passes] == ["scan units",
                                              "find zero-started residual branches",
                                              "output scale (eval mode)",
                                              "contrast gain (eval mode)"]
    loaded = dry_run(model, (3, 32, 32), RescaleOptions(), fresh={"fc"}, images=8, holdout=0)
    assert {u.name for u in loaded.units if u.within} == {"fc"}
    assert all(u.draw == "kept" for u in loaded.units if u.name != "fc")
    assert not any("residual branches" in n for n in loaded.notes)  # only on fresh nets
