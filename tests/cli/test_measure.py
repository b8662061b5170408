"""`ckptinit measure`: the JSON and the plot, and nothing else."""

from __future__ import annotations

import json

from tests.cli.helpers import ARCH, PNG_MAGIC, TINY, invoke


def test_measure_writes_json_and_png_and_nothing_else(tmp_path):
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    result = invoke("measure", ARCH, "--report", js, "--plot", png, *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.png"]
    assert result.stdout.split() == [str(js), str(png)]
    data = json.loads(js.read_text())
    assert data["command"] == "measure"
    assert len(data["units"]) == 16
    assert all(u["rate_before"] is not None for u in data["units"])
    assert all(u["mean_after"] is None for u in data["units"])  # nothing was changed
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "conv1.0" in result.stderr and "Summary:" in result.stderr


def test_measure_reports_a_fused_qkv_per_slice(tmp_path):
    """A ViT's fused qkv has one rate per slice; measure moves nothing, so no slice has a
    rate after, and the JSON is still written (it used to fail on the missing key)."""
    js = tmp_path / "m.json"
    result = invoke("measure", "vit_tiny_patch16_224", "--model-arg", "depth=1",
                    "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
                    "--report", js, *TINY)
    assert result.exit_code == 0, result.output
    qkv = next(u for u in json.loads(js.read_text())["units"] if u["name"] == "blocks.0.attn.qkv")
    assert [s["slice"] for s in qkv["slices"]] == ["q", "k", "v"]
    assert all(s["rate_before"] > 0 for s in qkv["slices"])
