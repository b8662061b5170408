"""A made-up report with every kind of unit, for the card and plot tests (no model needed)."""

from __future__ import annotations

from ckptinit.report import FunctionCheck, RunReport, UnitRecord

COMMAND = "ckptinit rescale hf-hub:timm/resnet18.a1_in1k --data me/photos --output r18"


def make_report(*, headless: bool = False, hub: bool = True) -> RunReport:
    """Five units: ok, pinned, excluded (no gradient), dead, and a status the card does not
    know ("tied"); a Hub source and Hub calibration data unless told otherwise."""
    def unit(i, name, **kw):
        base = dict(name=name, kind="Conv2d", shape=(8, 3, 3, 3), action="normalize",
                    mean_before=0.5 + i, std_before=2.0 + i, mean_after=0.1, std_after=1.0,
                    rate_before=10.0 ** i, rate_after=3.0, r=1.5, between_status="ok")
        base.update(kw)
        return UnitRecord(**base)

    units = [
        unit(0, "conv1"),
        unit(1, "layer1.conv", between_status="pinned", between_reason="GELU without a norm",
             rate_after=10.0, r=1.0),
        unit(2, "layer2.conv", between_status="excluded", between_reason="zero gradient",
             rate_before=0.0, rate_after=0.0, r=1.0),
        unit(3, "layer3.conv", status="dead", dead=2),
        unit(4, "fc", kind="Linear", shape=(10, 8), between_status="tied", draw="gaussian",
             action="gaussian+normalize"),
    ]
    source = {"source": "hf-hub:timm/resnet18.a1_in1k", "kind": "hf-hub",
              "repo_id": "timm/resnet18.a1_in1k", "revision": "abc123", "pretrained": True,
              "architecture": "resnet18", "num_classes": 0 if headless else 10,
              "loaded_count": 60, "missing_keys": ["fc.weight", "fc.bias"],
              "dropped_keys": []} if hub else {
              "source": "/home/someone/secret/ckpt.pth", "kind": "file",
              "path": "/home/someone/secret/ckpt.pth", "pretrained": True,
              "architecture": "resnet18", "num_classes": 0 if headless else 10,
              "loaded_count": 60, "missing_keys": [], "dropped_keys": []}
    data = {"source": "me/photos", "kind": "hub", "resolved": "me/photos", "split": "train",
            "revision": "deadbeef", "num_images": 64, "num_holdout": 16, "seed": 7,
            "shuffle_buffer": 1000, "skipped": 1, "augmented": 0,
            "transform": {"input_size": [3, 64, 64], "interpolation": "bicubic",
                          "crop_pct": 0.9, "crop_mode": "center", "mean": [0.4, 0.4, 0.4],
                          "std": [0.2, 0.2, 0.2]}} if hub else {
            "source": "/home/someone/photos", "kind": "folder",
            "resolved": "/home/someone/photos", "num_images": 8, "num_holdout": 4, "seed": 0,
            "transform": {"input_size": [3, 32, 32]}}
    return RunReport(
        version="0.1.0", command="rescale", method="within(units=1)+between(iters=2)",
        command_line=COMMAND, source=source, data=data,
        options={"beta": 0.1, "damping": 1.0, "tol": 0.01, "seed": 7}, units=units,
        between_iterations=2, converged=True,
        function_check=FunctionCheck(rel_change=2.5e-6, tolerance=1e-4, enforced=True,
                                     images=16))
