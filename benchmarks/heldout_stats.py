"""Issue 2's property on real photos: after the within-layer step, every conv and linear
output of a network without BatchNorm has per-channel std close to 1 on images that were
not used for calibration (photos from scikit-image that are not among the shipped samples).

    .venv/bin/pip install scikit-image   # only for this script
    .venv/bin/python benchmarks/heldout_stats.py vgg11
"""

from __future__ import annotations

import argparse
import json

import timm
import torch
from PIL import Image

from ckptinit.api import rescale
from ckptinit.data import load_calibration, resolve_data_config
from ckptinit.method.units import scan_units
from ckptinit.method.within import measure_outputs
from ckptinit.options import CalibrationOptions, RescaleOptions

OTHER = ["stereo_motorcycle", "moon", "page", "eagle", "cat", "colorwheel", "text", "lily",
         "skin", "microaneurysms"]


def other_photos(model) -> torch.Tensor:
    import numpy as np
    from skimage import data
    from timm.data import create_transform

    transform = create_transform(**resolve_data_config(model, CalibrationOptions()),
                                 is_training=False)
    out = []
    for name in OTHER:
        try:
            img = getattr(data, name)()
        except Exception:  # not shipped with this scikit-image, or needs a download
            continue
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 3 and img.shape[-1] not in (3, 4):
            continue  # volumes
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(1e-9, float(np.ptp(img)))).astype(np.uint8)
        out.append(transform(Image.fromarray(img).convert("RGB")))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="vgg11")
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    calib = load_calibration(model, CalibrationOptions(images=args.images, holdout=0))
    model, report = rescale(model, calib.images, RescaleOptions(between=False))
    held = other_photos(model)
    model.eval()
    scan = scan_units(model, held[:2])
    moments = measure_outputs(model, scan.units, [held])
    rows = []
    for u in scan.units:
        std = moments[u.name].std
        rows.append(dict(unit=u.name, median_std=float(std.median()),
                         mean_std=float(std.mean()), min_std=float(std.min()),
                         max_std=float(std.max())))
    means = [r["mean_std"] for r in rows]
    print(json.dumps(dict(model=args.model, heldout_photos=len(held), units=len(rows),
                          mean_std_range=[min(means), max(means)], per_unit=rows), indent=1))


if __name__ == "__main__":
    main()
