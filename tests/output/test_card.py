"""The model card: a pure function of the report, checked as text."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from ckptinit.output.card import public_report, render_card
from tests.output.helpers import COMMAND, make_report


def _front_matter(text: str) -> dict:
    return ModelCard(text).data.to_dict()


def test_front_matter_names_library_tags_base_model_datasets_and_license():
    meta = _front_matter(render_card(make_report(), license="apache-2.0"))
    assert meta["library_name"] == "timm"
    assert {"ckptinit", "image-classification", "timm"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["base_model"] == "timm/resnet18.a1_in1k"
    assert meta["datasets"] == ["me/photos"]
    assert meta["license"] == "apache-2.0"


def test_headless_is_feature_extraction_and_local_sources_name_no_hub():
    meta = _front_matter(render_card(make_report(headless=True, hub=False)))
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert "image-feature-extraction" in meta["tags"]
    assert "image-classification" not in meta["tags"]
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta


def test_body_holds_the_command_method_data_summary_plots_and_loading():
    text = render_card(make_report(), repo_id="me/r18-init")
    body = ModelCard(text).text
    assert f"```bash\n{COMMAND}\n```" in body
    assert "`within(units=1)+between(iters=2)`" in body
    assert "| damping | `1.0` |" in body and "| seed | `7` |" in body
    for row in ("| split | `train` |", "| revision | `deadbeef` |",
                "| images (fitting) | `64` |", "| seed | `7` |",
                "| preprocessing: input_size | `[3, 64, 64]` |",
                "| preprocessing: interpolation | `\"bicubic\"` |",
                "| preprocessing: mean | `[0.4, 0.4, 0.4]` |"):
        assert row in body, row
    assert "[me/photos](https://huggingface.co/datasets/me/photos)" in body
    assert "[timm/resnet18.a1_in1k](https://huggingface.co/timm/resnet18.a1_in1k)" in body
    assert "revision `abc123`" in body
    assert "1e+03× before, 1× after (2 iteration(s), converged)" in body
    assert "  - pinned: `layer1.conv` (GELU without a norm)" in body
    assert "  - excluded: `layer2.conv` (zero gradient)" in body
    assert "  - dead: `layer3.conv`" in body
    assert "  - frozen: `fc`" in body  # a status the card does not know, shown as it is
    assert "held-out images 2.5e-06 (within the tolerance 0.0001)" in body
    assert "![Change rate per unit, before and after](change_rates.png)" in body
    assert "(statistics.png)" in body
    assert 'timm.create_model("hf-hub:me/r18-init", pretrained=True)' in body
    assert body.startswith("\n# r18-init\n")
    assert body.count("| `") >= len(make_report().units)  # the per-unit table


def test_card_without_repository_says_how_to_load_both_ways():
    body = ModelCard(render_card(make_report())).text
    assert 'timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)' in body
    assert "ckptinit push FOLDER REPO_ID" in body
    assert "hf-hub:REPO_ID" in body


def test_same_report_same_card_from_the_object_or_its_json():
    report = make_report()
    from_json = json.loads(json.dumps(public_report(report)))
    assert render_card(report, license="mit") == render_card(from_json, license="mit")
    assert render_card(report) != render_card(report, repo_id="me/x")


def test_local_paths_never_reach_the_card():
    report = make_report(hub=False)
    text = render_card(report)
    assert "/home/someone" not in text
    assert "`ckpt.pth`" in text and "`photos`" in text
    assert public_report(report)["source"]["path"] == "ckpt.pth"


def test_missing_fields_do_not_break_it():
    text = render_card({"version": "9.9", "command": "rescale",
                        "units": [{"name": "x", "between_status": "limited"}]})
    body = ModelCard(text).text
    assert "  - limited: `x`" in body
    assert "Function check: not run" in body
    assert "The between-layer step did not run." in body


def test_held_out_rates_name_what_they_were_measured_on():
    """Distinct held-out images, or only other crops of the calibration images (too few)."""
    report = make_report()
    report.unit("conv1").rate_heldout, report.unit("fc").rate_heldout = 2.0, 3.0
    report.unit("fc").between_status = "ok"
    body = ModelCard(render_card(report)).text
    assert "1.5× re-measured on held-out images with other gradient draws" in body
    report.data["holdout_overlaps"] = True
    body = ModelCard(render_card(report)).text
    assert ("1.5× re-measured on other crops of the calibration images with other gradient "
            "draws") in body
